"""Async HTTP client for one engine speaking the SGLang subset (real SGLang or the embedded server).

Contract: every call is bounded by an aiohttp timeout; a connection failure, a timeout, a non-200
answer or a body that does not decode raises EngineError(url, route, reason) and nothing hangs.
The probes `health` and `health_generate` answer False instead of raising. Responses are decoded
into typed msgspec structs that ignore unknown fields, so SGLang's richer answers decode too.
Only fields SGLang accepts are sent (`sampling_params` keys are checked against SGLang's list).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec

# SamplingParams.__init__ keywords of SGLang 0.5.x; anything else would make SGLang reject the call.
SGLANG_SAMPLING_KEYS = frozenset(
    {
        "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
        "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens",
        "n", "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
        "spaces_between_special_tokens", "no_stop_trim", "custom_params", "stream_interval",
        "logit_bias", "sampling_seed",
    }
)  # fmt: skip
PAUSE_MODES = ("abort", "retract", "in_place")


class EngineError(RuntimeError):
    """A call to an engine failed; `reason` is one line, `status` the HTTP status if any."""

    def __init__(self, url: str, route: str, reason: str, *, status: int | None = None) -> None:
        super().__init__(f"engine {url}{route}: {reason}")
        self.url, self.route, self.reason, self.status = url, route, reason, status


class EngineLost(EngineError):
    """The engine serving this request failed; the request may be re-sent to another one."""


class GenerateOutput(msgspec.Struct, frozen=True):
    """One finished (or aborted) generation.

    logprobs[i] is the behaviour logprob of output_ids[i] (empty if logprobs were not asked for).
    weight_version is the engine's version when the response was produced; finish_reason is
    "stop", "length" or "abort" (an aborted request returns the tokens generated so far).
    token_versions is the version of each token when the engine reports it (SGLang >= 0.5.23's
    ``meta_info.weight_versions`` spans, which the embedded engine also sends), None otherwise.
    """

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    weight_version: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    token_versions: list[str] | None = None


class WeightUpdateResult(msgspec.Struct, frozen=True):
    success: bool
    message: str = ""
    num_paused_requests: int = 0


class LoRAUpdateOutput(msgspec.Struct, frozen=True):
    """SGLang's answer to /load_lora_adapter and /unload_lora_adapter."""

    success: bool
    error_message: str | None = None


# ---- response shapes (SGLang's; unknown fields ignored) -----------------------------------


class _CollectiveResult(msgspec.Struct):
    success: bool
    message: str = ""
    paused_s: float | None = None  # the embedded engine's pause-less swap


class _FinishReason(msgspec.Struct):
    type: str


class _VersionSpan(msgspec.Struct):
    """Output tokens [start, end) were produced by weights at ``version``."""

    version: str
    start: int
    end: int


class _MetaInfo(msgspec.Struct):
    finish_reason: _FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    e2e_latency: float = 0.0
    weight_version: str = ""
    output_token_logprobs: list[tuple[float, int, Any]] | None = None
    weight_versions: list[_VersionSpan] | None = None


class _GenerateResponse(msgspec.Struct):
    output_ids: list[int]
    meta_info: _MetaInfo


class _WeightVersion(msgspec.Struct):
    weight_version: str


class EngineClient:
    """Client for one engine at `base_url`; owns its aiohttp session unless one is passed in."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 60.0,
        session: aiohttp.ClientSession | None = None,
        api_key: str | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = session
        self._owns_session = session is None
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client created it; a session passed in stays open."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

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
        if _parallel(_checked([sampling_params])) != 1:
            raise ValueError("n > 1 answers several outputs: use generate_batch")
        body: dict[str, Any] = {
            "input_ids": list(input_ids),
            "sampling_params": sampling_params,
            "return_logprob": return_logprob,
        }
        if rid is not None:
            body["rid"] = rid
        if lora_path is not None:
            body["lora_path"] = lora_path
        raw = await self._call("POST", "/generate", body, timeout_s)
        resp = self._decode("/generate", raw, _GenerateResponse)
        return self._to_output(resp, return_logprob)

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
        if not input_ids:
            raise ValueError("generate_batch needs at least one prompt")
        per_prompt = sampling_params if isinstance(sampling_params, list) else [sampling_params]
        if isinstance(sampling_params, list) and len(sampling_params) != len(input_ids):
            raise ValueError(f"{len(sampling_params)} sampling_params for {len(input_ids)} prompts")
        if rids is not None and len(rids) != len(input_ids):
            raise ValueError(f"{len(rids)} rids for {len(input_ids)} prompts")
        n = _parallel(_checked(per_prompt))
        body: dict[str, Any] = {
            "input_ids": [list(ids) for ids in input_ids],
            "sampling_params": sampling_params,
            "return_logprob": return_logprob,
        }
        if rids is not None:
            body["rid"] = list(rids)
        if lora_path is not None:  # one adapter for the whole batch
            body["lora_path"] = lora_path
        raw = await self._call("POST", "/generate", body, timeout_s)
        resps = self._decode("/generate", raw, list[_GenerateResponse])
        if len(resps) != len(input_ids) * n:
            raise EngineError(
                self.base_url, "/generate", f"{len(resps)} outputs for {len(input_ids)} prompts x n={n}"
            )
        return [self._to_output(resp, return_logprob) for resp in resps]

    def _to_output(self, resp: _GenerateResponse, return_logprob: bool) -> GenerateOutput:
        meta = resp.meta_info
        if meta.finish_reason is None:
            raise EngineError(self.base_url, "/generate", "response has no finish_reason")
        logprobs = [entry[0] for entry in meta.output_token_logprobs or ()]
        if return_logprob and len(logprobs) != len(resp.output_ids):
            raise EngineError(
                self.base_url,
                "/generate",
                f"{len(logprobs)} logprobs for {len(resp.output_ids)} output tokens",
            )
        versions = None if meta.weight_versions is None else _expand(meta.weight_versions)
        if meta.weight_versions is not None and (versions is None or len(versions) != len(resp.output_ids)):
            raise EngineError(
                self.base_url, "/generate", f"weight_versions spans {msgspec.to_builtins(meta.weight_versions)} "
                f"do not cover the {len(resp.output_ids)} output tokens contiguously from 0"
            )
        return GenerateOutput(
            output_ids=resp.output_ids,
            logprobs=logprobs,
            finish_reason=meta.finish_reason.type,
            weight_version=meta.weight_version,
            prompt_tokens=meta.prompt_tokens,
            completion_tokens=meta.completion_tokens or len(resp.output_ids),
            latency_s=meta.e2e_latency,
            token_versions=versions,
        )

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
        return self._decode("/model_info", raw, _WeightVersion).weight_version

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
        try:
            raw = await self._call("POST", route, body)
        except EngineError as exc:
            if exc.status == 400:  # refused: SGLang's error_message is in the body
                raise EngineError(self.base_url, route, f"refused: {exc.reason}", status=400) from None
            raise
        result = self._decode(route, raw, LoRAUpdateOutput)
        if not result.success:
            raise EngineError(self.base_url, route, f"refused: {result.error_message}")

    async def destroy_weights_update_group(self, group_name: str) -> None:
        await self._weights_call("/destroy_weights_update_group", {"group_name": group_name}, None)

    async def _weights_call(self, route: str, body: dict[str, Any], timeout_s: float | None) -> _CollectiveResult:
        """SGLang answers these with {"success", "message"}; a refusal is an EngineError."""
        try:
            raw = await self._call("POST", route, body, timeout_s)
        except EngineError as exc:
            if exc.status == 400:  # refused: SGLang's message is in the body
                raise EngineError(self.base_url, route, f"refused: {exc.reason}", status=400) from None
            raise
        result = self._decode(route, raw, _CollectiveResult)
        if not result.success:
            raise EngineError(self.base_url, route, f"refused: {result.message}")
        return result

    # ---- transport ----------------------------------------------------------------------

    async def _call(self, method: str, route: str, body: Any, timeout_s: float | None = None) -> bytes:
        """One HTTP exchange; returns the body of a 200, raises EngineError otherwise."""
        limit = timeout_s if timeout_s is not None else self.timeout_s
        data = None if body is None else msgspec.json.encode(body)
        headers = {**self._headers, "Content-Type": "application/json"} if data is not None else self._headers
        try:
            async with self._get_session().request(
                method,
                self.base_url + route,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=limit),
            ) as resp:
                payload = await resp.read()
                status = resp.status
        except TimeoutError:
            raise EngineError(self.base_url, route, f"timed out after {limit:g}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise EngineError(self.base_url, route, f"connection failed: {exc!r}") from None
        if status != 200:
            raise EngineError(self.base_url, route, f"HTTP {status}: {_error_text(payload)}", status=status)
        return payload

    def _decode(self, route: str, raw: bytes, kind: Any) -> Any:
        try:
            return msgspec.json.decode(raw, type=kind)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise EngineError(self.base_url, route, f"undecodable response ({exc}): {raw[:200]!r}") from None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # no connection cap: callers bound in-flight requests, and a pooled wait would eat
            # into each request's timeout
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session


def _checked(sampling_params: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Refuse keys SGLang would reject (it answers 400 for unknown sampling_params keys)."""
    for params in sampling_params:
        unknown = set(params) - SGLANG_SAMPLING_KEYS
        if unknown:
            raise ValueError(f"sampling_params keys SGLang does not accept: {sorted(unknown)}")
    return sampling_params


def _parallel(sampling_params: list[dict[str, Any]]) -> int:
    """The n shared by every dict (SGLang refuses a batch whose dicts disagree)."""
    ns = {int(params.get("n", 1)) for params in sampling_params}
    if len(ns) != 1 or min(ns) < 1:
        raise ValueError(f"sampling_params n must be one value >= 1, got {sorted(ns)}")
    return ns.pop()


def _expand(spans: list[_VersionSpan]) -> list[str] | None:
    """Per-token versions from contiguous spans; None when the spans have a gap or overlap."""
    out: list[str] = []
    for span in spans:
        if span.start != len(out) or span.end < span.start:
            return None
        out += [span.version] * (span.end - span.start)
    return out


def _error_text(payload: bytes) -> str:
    """The one-line reason from an error body ({"error"} or {"message"}), else its start."""
    try:
        decoded = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        decoded = None
    if isinstance(decoded, dict):
        for key in ("error", "message", "error_message", "detail"):
            if isinstance(decoded.get(key), str):
                return decoded[key]
            if isinstance(decoded.get(key), dict) and isinstance(decoded[key].get("message"), str):
                return decoded[key]["message"]
    return payload[:300].decode("utf-8", "replace").strip() or "(empty body)"
