"""The embedded engine at RL lengths on one GPU: tokens/s against HF generate and the bandwidth limit.

    python benchmarks/engine_gpu_lengths.py [--shapes 512x128x1024,512x20x256,128x128x4096]
        [--hf-steps 32] [--skip-hf] [--out DIR]

A random model of Qwen3-0.6B's real shape (hidden 1024, 28 layers, 16 heads of 128, 8 KV heads, FFN
3072, vocab 151936, tied embedding, bf16) is saved once and served by the engine's HTTP server
(`python -m policies.engine.server --device cuda --dtype bfloat16`, --max-running-requests = the
largest row count). For each shape ROWSxPROMPTxNEW, ROWS requests (groups of 8 sharing a prompt,
sent at once as one /generate body per group with n = 8, temperature 1, ignore_eos) each generate
exactly NEW tokens; tokens/s = ROWS x NEW / (first send -> last answer). Between shapes the engine
releases its KV memory (/release_memory_occupation), as a colocated engine does.

Side by side, on the same model in process after the engine has exited:
  HF generate   transformers' generate (dynamic cache, SDPA, sampling, no EOS) at the shape's rows:
                its tokens/s over its first K decode steps (an upper bound: its steps only get
                slower as the context grows), and its tokens/s at the whole shape estimated from
                its measured prefill and decode steps measured at three context lengths (see
                hf_generate); the ratio uses the latter.
  limit         the memory-bandwidth limit: every decode step reads every weight once and each
                row's whole KV cache once; summed over the NEW steps at the H200's 4.8 TB/s.
                Prefill (compute-bound, one step) is left out, so the limit is generous.
HF's static cache with a compiled forward is not run: compiling the 28-layer model takes minutes of
the lent machine per shape.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import aiohttp
import torch
import transformers

from policies.engine.process import EngineProcess

HBM_BYTES_PER_S = 4.8e12  # H200
GROUP = 8


def qwen3_06b(max_positions: int) -> transformers.Qwen3Config:
    return transformers.Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=max_positions, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def random_model(config: transformers.PretrainedConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init on the GPU: seconds
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in s.split("x")) for s in text.split(",")]  # type: ignore[misc]


def prompts(rows: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 151936) for _ in range(length - 1)] for _ in range(rows // GROUP)]


def bandwidth_limit(model: torch.nn.Module, rows: int, prompt: int, new: int) -> float:
    """Tokens/s if every decode step only read the weights and each row's KV cache once."""
    c = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 2  # bf16
    contexts = new * prompt + new * (new - 1) / 2  # sum over steps of each row's cached tokens
    total = new * weight_bytes + rows * kv_per_token * contexts
    return rows * new / (total / HBM_BYTES_PER_S)


async def engine_run(url: str, rows: int, prompt: int, new: int, seed: int) -> tuple[float, int]:
    params = {"temperature": 1.0, "max_new_tokens": new, "ignore_eos": True, "n": GROUP}
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as s:

        async def group(i: int, ids: list[int]) -> int:
            body = {"input_ids": ids, "sampling_params": {**params, "sampling_seed": seed * 10_000 + i}}
            async with s.post(f"{url}/generate", json=body) as resp:
                answers = await resp.json()
                assert resp.status == 200, answers
            assert all(len(a["output_ids"]) == new for a in answers)
            return sum(len(a["output_ids"]) for a in answers)

        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(group(i, p) for i, p in enumerate(prompts(rows, prompt, seed)))))
        elapsed = time.perf_counter() - t0
        async with s.post(f"{url}/release_memory_occupation", json={"tags": ["kv_cache"]}) as resp:
            assert resp.status == 200
        async with s.post(f"{url}/continue_generation", json={}) as resp:
            assert resp.status == 200
    return elapsed, tokens


async def engine_table(model_dir: Path, shapes, log_dir: Path) -> dict:  # noqa: ANN001
    proc = EngineProcess(
        model_dir, log_path=log_dir / "engine.log", device="cuda", dtype="bfloat16",
        max_running_requests=max(r for r, _, _ in shapes),
    )  # fmt: skip
    proc.start()
    results = {}
    try:
        await proc.wait_ready(timeout_s=600)
        # warm-up: cuBLAS, the allocator, the attention kernel's compile, small graphs
        await engine_run(proc.url, 64, 16, 16, seed=99)
        for rows, prompt, new in shapes:
            elapsed, tokens = await engine_run(proc.url, rows, prompt, new, seed=rows + new)
            results[rows, prompt, new] = tokens / elapsed
            print(f"engine {rows}x({prompt}+{new}): {tokens / elapsed:,.0f} tokens/s ({elapsed:.1f} s)", flush=True)
    finally:
        await proc.stop()
    return results


class _Clock(transformers.LogitsProcessor):
    """Timestamps every call: generate calls logits processors once per new token, right after the
    forward that produced its logits (the first after the prefill)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


@torch.inference_mode()
def hf_generate(model: torch.nn.Module, rows: int, prompt: int, new: int, steps: int) -> tuple[float, float]:
    """(HF's tokens/s over its first `steps` new tokens, its estimated tokens/s at the whole shape).

    The estimate: HF's prefill of the prompt plus NEW decode steps whose time is interpolated
    linearly in the context length between two measured points (K steps each from contexts PROMPT
    and PROMPT + NEW - K). HF's step time grows linearly with the context (attention reads it, and
    its cache is re-concatenated every step), so this is close to a full run, which would take
    minutes of the lent machine at the longest shape."""
    model.generation_config.eos_token_id = None  # generate exactly the asked number of tokens
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)

    def measure(context: int) -> tuple[float, float]:
        ids = [p + [5] * (context - prompt) for p in prompts(rows, prompt, 7)]
        ids = torch.tensor([p for p in ids for _ in range(GROUP)], device="cuda")
        clock = _Clock()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        processors = transformers.LogitsProcessorList([clock])
        out = model.generate(ids, max_new_tokens=1 + steps, logits_processor=processors, **kw)
        assert out.shape[1] == context + 1 + steps
        gaps = sorted(b - a for a, b in zip(clock.times, clock.times[1:]))
        return clock.times[0] - t0, gaps[len(gaps) // 2]  # (prefill, median decode step)

    measure(prompt)  # warm-up
    prefill, first = measure(prompt)
    c1 = prompt + new - steps
    last = measure(c1)[1]
    total = prefill + sum(first + (last - first) * t / (c1 - prompt) for t in range(new))
    return rows / first, rows * new / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="512x128x1024,512x20x256,128x128x4096")
    p.add_argument("--hf-steps", type=int, default=32)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--out", default=None, help="directory for table.md and results.json")
    args = p.parse_args()
    shapes = parse_shapes(args.shapes)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
    work = Path(tempfile.mkdtemp(prefix="engine-lengths-"))
    config = qwen3_06b(max(p + n for _, p, n in shapes) + 64)
    model = random_model(config)
    model.save_pretrained(work / "model")
    limits = {s: bandwidth_limit(model, *s) for s in shapes}
    del model
    torch.cuda.empty_cache()
    engine = asyncio.run(engine_table(work / "model", shapes, work))
    hf = {}
    if not args.skip_hf:
        model = random_model(config)
        for s in shapes:
            hf[s] = hf_generate(model, *s, steps=args.hf_steps)
            print(f"HF generate {s}: {hf[s][0]:,.0f} tokens/s first, {hf[s][1]:,.0f} at the shape", flush=True)
    lines = [
        "| requests x (prompt + new) | engine tokens/s | HF generate, first K steps | HF generate at the shape "
        "| engine / HF | bandwidth limit | engine / limit |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in shapes:
        rows, prompt, new = s
        first, whole = hf.get(s, (float("nan"), float("nan")))
        lines.append(
            f"| {rows} x ({prompt} + {new:,}) | {engine[s]:,.0f} | {first:,.0f} | {whole:,.0f}"
            f" | {engine[s] / whole:.1f}x | {limits[s]:,.0f} | {engine[s] / limits[s]:.0%} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(table + "\n")
        rows = [{"shape": list(s), "engine": engine[s], "hf": hf.get(s), "limit": limits[s]} for s in shapes]
        (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
