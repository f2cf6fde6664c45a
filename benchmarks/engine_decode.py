"""How fast does the embedded engine serve the runtime's request pattern? Real engine processes, real HTTP.

    python benchmarks/engine_decode.py [--rounds 20] [--warmup 3] [--shapes 64x128,128x512]

One step is what the default recipe asks of the engines per learner step: 16 prompt groups x 8
samples = 128 requests, each a 10-token prompt (a group shares its prompt) and exactly 6 new
tokens (ignore_eos), temperature 1, a seed per sample, all fired at once like the generator does.
Variants, each on its own engine process:

    no-cache        --kv-cache off (every decode step recomputes every row), one /generate per sample
    kv              KV cache, one /generate per sample
    kv+batch        KV cache, one batched /generate per group (8 prompts, one seed each)

for each model shape HIDDENxFFN (2 layers, 4 heads, 2 KV heads, the default recipe's vocabulary).
Every engine is started first; then rounds run the variants one after another (each alone on the
machine, in the same round), so noise from other load hits them alike. Reported: the median
seconds per step over the rounds after warmup, generated tokens per second, and the speed-up
against no-cache.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from policies.engine import EngineClient, EngineProcess
from policies.engine.server import KV_CACHE_ENV
from policies.model import qwen3_config, write_random_checkpoint
from policies.tokenizer import word_tokenizer

GROUPS, SAMPLES, PROMPT_LEN, NEW_TOKENS = 16, 8, 10, 6
PARAMS = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}


def write_model(root: Path, hidden: int, ffn: int) -> Path:
    tok = word_tokenizer([str(d) for d in range(10)] + ["="])  # the default recipe's vocabulary
    config = qwen3_config(
        vocab_size=len(tok), num_layers=2, hidden_size=hidden, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=ffn, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    return write_random_checkpoint(root / f"model_{hidden}x{ffn}", config, tok, seed=0)


def prompts(rng: random.Random) -> list[list[int]]:
    return [[1] + [rng.randrange(3, 14) for _ in range(PROMPT_LEN - 1)] for _ in range(GROUPS)]


async def per_sample(client: EngineClient, groups: list[list[int]], seed: int) -> int:
    outs = await asyncio.gather(
        *(
            client.generate(prompt, {**PARAMS, "sampling_seed": seed + g * SAMPLES + s})
            for g, prompt in enumerate(groups)
            for s in range(SAMPLES)
        )
    )
    return sum(len(o.output_ids) for o in outs)


async def per_group(client: EngineClient, groups: list[list[int]], seed: int) -> int:
    batches = await asyncio.gather(
        *(
            client.generate_batch(
                [prompt] * SAMPLES, [{**PARAMS, "sampling_seed": seed + g * SAMPLES + s} for s in range(SAMPLES)]
            )
            for g, prompt in enumerate(groups)
        )
    )
    return sum(len(o.output_ids) for outs in batches for o in outs)


VARIANTS: dict[str, tuple[str, Callable[[EngineClient, list[list[int]], int], Awaitable[int]]]] = {
    "no-cache": ("off", per_sample),
    "kv": ("on", per_sample),
    "kv+batch": ("on", per_group),
}


async def start_engine(model: Path, log: Path, kv_cache: str) -> EngineProcess:
    os.environ[KV_CACHE_ENV] = kv_cache  # EngineProcess passes the environment on; it has no flag for this
    try:
        proc = EngineProcess(model, log_path=log, torch_threads=1)
        proc.start()
    finally:
        os.environ.pop(KV_CACHE_ENV)
    return proc


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="engine_decode_"))
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    runs = {}  # (shape, variant) -> (process, client, timings)
    try:
        for hidden, ffn in shapes:
            model = write_model(root, hidden, ffn)
            for name, (kv_cache, _) in VARIANTS.items():
                proc = await start_engine(model, root / f"{hidden}x{ffn}-{name}.log", kv_cache)
                runs[(f"{hidden}x{ffn}", name)] = (proc, None, [])
        for key, (proc, _, times) in runs.items():
            url = await proc.wait_ready(timeout_s=180)
            client = EngineClient(url, timeout_s=120)
            assert (await client.get_server_info())["kv_cache"] == (VARIANTS[key[1]][0] == "on")
            runs[key] = (proc, client, times)
        rng = random.Random(0)
        for r in range(args.warmup + args.rounds):
            groups = prompts(rng)
            for (_, name), (_, client, times) in runs.items():
                start = time.perf_counter()
                tokens = await VARIANTS[name][1](client, groups, seed=r * GROUPS * SAMPLES)
                assert tokens == GROUPS * SAMPLES * NEW_TOKENS
                if r >= args.warmup:
                    times.append(time.perf_counter() - start)
        report(runs)
    finally:
        for proc, client, _ in runs.values():
            if client is not None:
                await client.close()
            await proc.stop()


def report(runs: dict) -> None:
    tokens = GROUPS * SAMPLES * NEW_TOKENS
    print(f"\n{GROUPS * SAMPLES} requests x {NEW_TOKENS} tokens per step, {PROMPT_LEN}-token prompts")
    print(f"{'shape':>8} {'variant':>10} {'median s/step':>14} {'min':>7} {'max':>7} {'tokens/s':>9} {'speed-up':>8}")
    base = {}
    for (shape, name), (_, _, times) in runs.items():
        step = statistics.median(times)
        base.setdefault(shape, step)
        print(
            f"{shape:>8} {name:>10} {step:14.4f} {min(times):7.4f} {max(times):7.4f} {tokens / step:9.0f}"
            f" {base[shape] / step:7.2f}x"
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--shapes", default="64x128,128x512", help="comma-separated HIDDENxFFN model shapes")
    asyncio.run(main(p.parse_args()))
