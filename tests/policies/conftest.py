"""Fixtures for the engine tests: tiny random checkpoints on disk, a module-scoped engine
subprocess, and small async helpers (pytest-asyncio is not used: tests call `asyncio.run`); for
the SGLang contract tests (test_sglang_*.py), what the client sends and the sglang source."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import sglang_api
import sglang_source as sgl
import torch
import transformers
from sglang_client_record import Sent, record_client_requests

from policies.engine import EngineClient, EngineProcess

TINY_CONFIG = dict(
    vocab_size=32,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)


def build_tiny_model(path: Path, *, seed: int) -> Path:
    """A random Qwen3 checkpoint (config.json + model.safetensors) in `path`."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(**TINY_CONFIG))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_a"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture, different random weights: the target of weight updates."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_b"), seed=1)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    """One engine subprocess per test module (starting one costs seconds)."""
    proc = EngineProcess(tiny_model_dir, log_path=tmp_path_factory.mktemp("engine_log") / "engine.log")
    proc.start()
    try:
        asyncio.run(proc.wait_ready(timeout_s=90))
        yield proc
    finally:
        asyncio.run(proc.stop())


def run_with_client(url: str, body: Callable[[EngineClient], Awaitable[None]], *, timeout_s: float = 30) -> None:
    """Run `body(client)` on a fresh event loop, bounded by timeout_s so a bug cannot hang pytest."""

    async def main() -> None:
        async with EngineClient(url, timeout_s=timeout_s) as client:
            await asyncio.wait_for(body(client), timeout_s)

    asyncio.run(main())


async def stats(client: EngineClient) -> dict:
    """The embedded engine's scheduler counters (get_server_info internal_states)."""
    return (await client.get_server_info())["internal_states"][0]


async def wait_until(client: EngineClient, predicate: Callable[[dict], bool], *, timeout_s: float = 10) -> dict:
    """Poll the engine's counters until predicate(stats) holds; fail after timeout_s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        current = await stats(client)
        if predicate(current):
            return current
        assert loop.time() < deadline, f"engine never reached the expected state; last stats {current}"
        await asyncio.sleep(0.002)  # polling a remote process with a deadline


def kept_logprobs(model_a, model_b, prompt: list[int], out: list[int], k: int) -> torch.Tensor:  # noqa: ANN001
    """Logprobs of out[k:] for a request frozen in place across an update after k tokens: the
    prompt and out[:k-1] were cached under model A (the last sampled token is not yet cached),
    everything from out[k-1] on runs under model B on top of that cache."""
    with torch.inference_mode():
        cache = transformers.DynamicCache(config=model_a.config)
        model_a(input_ids=torch.tensor([prompt + out[: k - 1]]), past_key_values=cache, use_cache=True)
        logits = model_b(input_ids=torch.tensor([out[k - 1 : -1]]), past_key_values=cache, use_cache=True).logits[0]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(out[k:])[:, None])[:, 0]


class EngineKit:
    """The helpers above, handed to tests as the `kit` fixture (conftest is not importable)."""

    run_with_client = staticmethod(run_with_client)
    stats = staticmethod(stats)
    wait_until = staticmethod(wait_until)
    kept_logprobs = staticmethod(kept_logprobs)


@pytest.fixture(scope="session")
def kit() -> type[EngineKit]:
    return EngineKit


# ---- the SGLang contract (test_sglang_*.py): built once, read by every check -------------


@pytest.fixture(scope="session")
def sent() -> list[Sent]:
    return record_client_requests()


@pytest.fixture(scope="session")
def src() -> Iterator[sgl.SglangSource]:
    try:
        wheel = sgl.ensure_wheel()
    except sgl.SglangUnavailable as exc:
        pytest.skip(f"sglang source unavailable (no cached wheel in {sgl.CACHE_DIR}): {exc}")
    source = sgl.SglangSource(wheel)
    print(f"checking against sglang {source.version} ({wheel})")
    yield source
    source.close()


@pytest.fixture(scope="session")
def contract(src):
    module = sglang_api.load_api_contract(src)
    if module is None:
        pytest.skip(f"sglang {src.version} has no {sgl.API_CONTRACT}")
    return module


@pytest.fixture(scope="module")
def hf_models(tiny_model_dir, tiny_model_dir_b):
    load = transformers.AutoModelForCausalLM.from_pretrained
    return {d: load(d).eval() for d in (tiny_model_dir, tiny_model_dir_b)}
