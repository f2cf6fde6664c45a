"""Async HTTP client for one engine speaking the SGLang subset (real SGLang or the embedded server).

Contract: every call is bounded by an aiohttp timeout; a connection failure, a timeout, a non-200
answer or a body that does not decode raises EngineError(url, route, reason) and nothing hangs
(``transport``). The probes `health` and `health_generate` answer False instead of raising.
Responses are decoded into typed msgspec structs that ignore unknown fields (``replies``), so
SGLang's richer answers decode too. Only fields SGLang accepts are sent (``generate_body`` checks
`sampling_params` keys against SGLang's list).
"""

from __future__ import annotations

from typing import Any

import policies.engine.generate_body as generate_body  # the module itself, not through the package __init__
from policies.engine.errors import EngineError, EngineLost
from policies.engine.generate_body import SGLANG_SAMPLING_KEYS
from policies.engine.replies import (
    CollectiveResult,
    GenerateOutput,
    GenerateResponse,
    LoRAUpdateOutput,
    WeightUpdateResult,
    WeightVersion,
    to_output,
)
from policies.engine.transport import EngineTransport

__all__ = ["PAUSE_MODES", "SGLANG_SAMPLING_KEYS", "EngineClient", "EngineError", "EngineLost", "GenerateOutput",
           "LoRAUpdateOutput", "WeightUpdateResult"]

PAUSE_MODES = ("abort", "retract", "in_place")


class EngineClient(EngineTransport):
    """Client for one engine at `base_url`: SGLang's routes over ``EngineTransport``."""

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- generation ---------------------------------------------------------------------

    async def generate(
        self,
        input_ids: list[int],
        sampling_params: dict[str, Any],
        *,
        rid: str | None = None,
        return_logprob: bool = True,
        timeout_s: float | None = None,
        lora_path: str | None = None,
    ) -> GenerateOutput:
        """``lora_path``: the name of a loaded LoRA adapter to generate with (None: the base model)."""
        body = generate_body.single(input_ids, sampling_params, rid=rid, return_logprob=return_logprob,
                                    lora_path=lora_path)
        raw = await self._call("POST", "/generate", body, timeout_s)
        resp = self._decode("/generate", raw, GenerateResponse)
        return to_output(resp, return_logprob, url=self.base_url)

    async def generate_batch(
        self,
        input_ids: list[list[int]],
        sampling_params: dict[str, Any] | list[dict[str, Any]],
        *,
        rids: list[str] | None = None,
        return_logprob: bool = True,
        timeout_s: float | None = None,
        lora_path: str | None = None,
    ) -> list[GenerateOutput]:
        """Several prompts in one /generate (SGLang's batch form); one output per prompt, in order.

        `sampling_params` is shared or one dict per prompt; with "n": k (equal in every dict) each
        prompt yields k outputs, prompt-major. Each member is its own request on the engine:
        `rids[i]` names prompt i (with n > 1 the embedded engine names its samples
        f"{rids[i]}_{j}"), so `abort` ends one member while the others run on. The timeout and
        EngineError contract are generate's, for the call as a whole.
        """
        body, n = generate_body.batch(input_ids, sampling_params, rids=rids, return_logprob=return_logprob,
                                      lora_path=lora_path)
        raw = await self._call("POST", "/generate", body, timeout_s)
        resps = self._decode("/generate", raw, list[GenerateResponse])
        if len(resps) != len(input_ids) * n:
            raise EngineError(
                self.base_url, "/generate", f"{len(resps)} outputs for {len(input_ids)} prompts x n={n}"
            )
        return [to_output(resp, return_logprob, url=self.base_url) for resp in resps]

    async def abort(self, rid: str) -> None:
        await self._call("POST", "/abort_request", {"rid": rid})

    async def abort_all(self) -> None:
        await self._call("POST", "/abort_request", {"abort_all": True})

    async def pause(self, mode: str = "abort") -> None:
        """Pause generation; returns once the engine is quiescent (see PROTOCOL.md for modes)."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode must be one of {PAUSE_MODES}, got {mode!r}")
        await self._call("POST", "/pause_generation", {"mode": mode})

    async def resume(self) -> None:
        await self._call("POST", "/continue_generation", {})

    # ---- probes and info ----------------------------------------------------------------

    async def health(self, *, timeout_s: float | None = None) -> bool:
        return await self._probe("/health", timeout_s)

    async def health_generate(self, *, timeout_s: float | None = None) -> bool:
        return await self._probe("/health_generate", timeout_s)

    async def _probe(self, route: str, timeout_s: float | None) -> bool:
        try:
            await self._call("GET", route, None, timeout_s)
        except EngineError:
            return False
        return True

    async def get_weight_version(self) -> str:
        # /model_info: SGLang 0.5.23 has no /get_weight_version (the embedded engine serves both)
        raw = await self._call("GET", "/model_info", None)
        return self._decode("/model_info", raw, WeightVersion).weight_version

    async def get_server_info(self) -> dict[str, Any]:
        raw = await self._call("GET", "/get_server_info", None)
        return self._decode("/get_server_info", raw, dict[str, Any])

    async def flush_cache(self) -> None:
        await self._call("POST", "/flush_cache", None)

    # ---- weights ------------------------------------------------------------------------

    async def update_weights_from_disk(
        self,
        model_path: str,
        *,
        weight_version: str | None,
        abort_all_requests: bool = False,
        timeout_s: float | None = None,
    ) -> WeightUpdateResult:
        """Load a saved HF checkpoint into the live engine; raises EngineError if it refuses."""
        body: dict[str, Any] = {"model_path": model_path, "abort_all_requests": abort_all_requests}
        if weight_version is not None:
            body["weight_version"] = weight_version
        raw = await self._call("POST", "/update_weights_from_disk", body, timeout_s)
        result = self._decode("/update_weights_from_disk", raw, WeightUpdateResult)
        if not result.success:
            raise EngineError(self.base_url, "/update_weights_from_disk", f"refused: {result.message}")
        return result

    async def update_weight_version(self, new_version: str, *, abort_all_requests: bool = False) -> None:
        body = {"new_version": new_version, "abort_all_requests": abort_all_requests}
        await self._call("POST", "/update_weight_version", body)

    async def init_weights_update_group(self, *, master_address: str, master_port: int, rank_offset: int,
                                        world_size: int, group_name: str, backend: str,
                                        timeout_s: float | None = None) -> None:
        """Join the learner's weight-update group (returns once every rank has joined)."""
        body = {"master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
                "world_size": world_size, "group_name": group_name, "backend": backend}
        await self._weights_call("/init_weights_update_group", body, timeout_s)

    async def update_weights_from_distributed(self, *, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                              group_name: str, weight_version: str | None,
                                              load_format: str | None = "flattened_bucket",
                                              timeout_s: float | None = None) -> float | None:
        """Receive one bucket the learner broadcasts in the group; returns once it is loaded, with
        the seconds the engine stopped decoding for it when it swapped without a pause (the
        embedded engine says; SGLang does not: None)."""
        body: dict[str, Any] = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
                                "flush_cache": False, "abort_all_requests": False, "load_format": load_format}
        if weight_version is not None:
            body["weight_version"] = weight_version
        return (await self._weights_call("/update_weights_from_distributed", body, timeout_s)).paused_s

    async def update_weights_from_tensor(self, serialized_named_tensors: list[bytes], *, weight_version: str | None,
                                         load_format: str | None = "flattened_bucket",
                                         timeout_s: float | None = None) -> float | None:
        """Load weights an engine on the same GPU maps from the trainer's memory (CUDA IPC):
        ``serialized_named_tensors`` holds one serialized payload per TP rank (policies/weight_ipc.py),
        sent base64 as SGLang's HTTP route expects. Returns once loaded, with the seconds decoding
        stopped for a pause-less swap (the embedded engine says; SGLang does not: None)."""
        body: dict[str, Any] = {"serialized_named_tensors": serialized_named_tensors, "load_format": load_format,
                                "flush_cache": False, "abort_all_requests": False}  # msgspec: bytes -> base64
        if weight_version is not None:
            body["weight_version"] = weight_version
        return (await self._weights_call("/update_weights_from_tensor", body, timeout_s)).paused_s

    async def release_memory_occupation(self, tags: list[str] | None = None, *, timeout_s: float | None = None) -> None:
        """Free the engine's GPU memory of ``tags`` ("kv_cache", "weights"; None: all) for the
        learner; SGLang expects a paused engine (the embedded one pauses itself)."""
        await self._call("POST", "/release_memory_occupation", {"tags": tags}, timeout_s)

    async def resume_memory_occupation(self, tags: list[str] | None = None, *, timeout_s: float | None = None) -> None:
        await self._call("POST", "/resume_memory_occupation", {"tags": tags}, timeout_s)

    async def begin_weight_update(self) -> None:
        """Open SGLang's weight-update session (0.5.23 loads broadcast buckets only inside one);
        an engine without the route (older SGLang) needs none."""
        await self._session_call("/begin_weight_update")

    async def end_weight_update(self) -> None:
        await self._session_call("/end_weight_update")

    async def _session_call(self, route: str) -> None:
        try:
            await self._weights_call(route, {}, None)
        except EngineError as exc:
            if exc.status != 404:
                raise

    async def load_lora_adapter(self, lora_name: str, lora_path: str) -> None:
        """Load the peft adapter directory ``lora_path`` under ``lora_name`` (SGLang needs
        --enable-lora; the embedded engine merges it into its weights); EngineError if refused."""
        await self._lora_call("/load_lora_adapter", {"lora_name": lora_name, "lora_path": lora_path})

    async def unload_lora_adapter(self, lora_name: str) -> None:
        await self._lora_call("/unload_lora_adapter", {"lora_name": lora_name})

    async def _lora_call(self, route: str, body: dict[str, Any]) -> None:
        raw = await self._refusable_call(route, body)  # refused: SGLang's error_message is in the body
        result = self._decode(route, raw, LoRAUpdateOutput)
        if not result.success:
            raise EngineError(self.base_url, route, f"refused: {result.error_message}")

    async def destroy_weights_update_group(self, group_name: str) -> None:
        await self._weights_call("/destroy_weights_update_group", {"group_name": group_name}, None)

    async def _weights_call(self, route: str, body: dict[str, Any], timeout_s: float | None) -> CollectiveResult:
        """SGLang answers these with {"success", "message"}; a refusal is an EngineError."""
        raw = await self._refusable_call(route, body, timeout_s)  # refused: SGLang's message is in the body
        result = self._decode(route, raw, CollectiveResult)
        if not result.success:
            raise EngineError(self.base_url, route, f"refused: {result.message}")
        return result
