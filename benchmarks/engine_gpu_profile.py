"""Where one decode step of the engine goes at RL lengths, and what the kernels can do.

    python benchmarks/engine_gpu_profile.py [--rows 512] [--context 600] [--old]

1. torch.profiler over decode steps of ModelRunner (the engine's model side, CUDA graphs on) at
   ROWS rows of CONTEXT cached tokens, Qwen3-0.6B's real shape (random, bf16; the model of
   engine_gpu_lengths.py), attending to the width bucket past the longest row, in three
   configurations side by side: decoder layers eager with torch's sampler; layers compiled
   (ASYNCRL_ENGINE_COMPILE) with torch's sampler; layers compiled with the Triton sampling kernel
   (ASYNCRL_ENGINE_SAMPLER; the default now). Wall and GPU-kernel time per step, the top kernels of
   the last. (--old: the first session's pair instead: the whole slot buffer against the bucket.)
2. One layer's decode attention at that shape ([rows, 8 KV heads, 2 query heads each, 128]) timed
   with CUDA events: SDPA (cuDNN) over the bucket, and the Triton split-KV kernel at several launch
   parameters (columns per block, warps, pipeline stages); effective bandwidth = bytes of K and V
   in the live columns / time. (--old: also SDPA's other backends, matmul-softmax-matmul, flex.)
3. Sampling one token per row from [ROWS, 151936] bf16 logits: sampling.sample's torch path
   against the Triton kernel (wall time per call, the host's copy of the tokens included).
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch
from engine_gpu_lengths import qwen3_06b, random_model
from torch.nn.attention import SDPBackend, sdpa_kernel

from policies.engine import sampling
from policies.engine.request import make_generator
from policies.engine.runner import ModelRunner
from policies.engine.sampling import Row, RowParams


def cuda_ms(fn, iters: int = 20) -> float:  # noqa: ANN001
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def profile_steps(runner: ModelRunner, rows: int, context: int, full_width: bool, label: str, table: bool) -> None:
    from torch.profiler import ProfilerActivity, profile

    runner.release_memory()
    decoder = runner._decoder
    decoder.WIDTH_STEP = 1 << 30 if full_width else type(decoder).WIDTH_STEP
    rng = random.Random(0)
    base = [[1] + [rng.randrange(3, 151936) for _ in range(context - 1)] for _ in range(rows // 8)]
    seqs = [(k, list(base[k // 8]), RowParams(1.0, 1.0, -1, make_generator(1.0, k))) for k in range(rows)]

    def step() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = runner.step([Row(k, toks, params) for k, toks, params in seqs]).tokens
        for (_, toks, _), t in zip(seqs, tokens, strict=True):
            toks.append(t)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    prefill = step()
    if full_width:
        decoder.cache.reserve(rows, 1024)  # the doubling buffer the old decoder had at this length
    warm = [step() for _ in range(3)]  # captures the graph
    steps = 4
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = sum(step() for _ in range(steps)) / steps
    ka = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in ka if e.device_type == torch.autograd.DeviceType.CUDA) / steps / 1e3
    cache = decoder.cache
    print(
        f"\n== {label}: {rows} rows x ~{context} cached tokens, buffer {cache.width_capacity} columns,"
        f" attended {decoder.width_bucket() if not full_width else cache.width_capacity}; prefill {prefill:.2f} s,"
        f" first decode steps {', '.join(f'{t * 1e3:.1f}' for t in warm)} ms"
    )
    print(f"decode step: wall {wall * 1e3:.2f} ms (profiled), GPU kernel time {gpu:.2f} ms;"
          f" {rows / wall:,.0f} tokens/s")  # fmt: skip
    if table:
        print(ka.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=70))


def attention_variants(rows: int, context: int, flex: bool, old: bool) -> None:
    kv_heads, group, dim, cap = 8, 2, 128, 1280
    w = -(-(context + 1) // 256) * 256
    g = torch.Generator(device="cuda").manual_seed(0)
    buf = torch.randn(2, rows, kv_heads, cap, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(rows, kv_heads, group, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    starts = torch.zeros(rows, dtype=torch.long, device="cuda")
    ends = torch.full((rows,), context, dtype=torch.long, device="cuda")
    scale = dim**-0.5

    def masked(width: int) -> torch.Tensor:
        columns = torch.arange(width, device="cuda")
        return ((columns >= starts[:, None]) & (columns <= ends[:, None]))[:, None, None, :]

    def sdpa(width: int, backend: SDPBackend | None = None):  # noqa: ANN202
        k, v, mask = buf[0, :, :, :width], buf[1, :, :, :width], masked(width)

        def run() -> torch.Tensor:
            if backend is None:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

        return run

    def manual(width: int):  # noqa: ANN202
        k, v, mask = buf[0, :, :, :width], buf[1, :, :, :width], masked(width)

        def run() -> torch.Tensor:
            scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(q.dtype)
            return torch.matmul(probs, v)

        return run

    reference = sdpa(w, SDPBackend.MATH)().float()
    variants = {f"sdpa default, {w} columns": sdpa(w)}
    if old:
        variants |= {
            f"sdpa whole buffer ({cap} columns)": sdpa(cap),
            f"sdpa math, {w} columns": sdpa(w, SDPBackend.MATH),
            f"sdpa efficient, {w} columns": sdpa(w, SDPBackend.EFFICIENT_ATTENTION),
            f"matmul-softmax-matmul, {w} columns": manual(w),
        }
        if flex:
            variants[f"flex_attention, {w} columns"] = flex_variant(q, buf, w, starts, ends, scale)
    # the engine's kernel (policies/engine/triton_decode.py) at its default launch, then others
    grid = [(64, 4, 2, 1), (64, 4, 2, 2), (64, 4, 3, 1), (64, 4, 4, 1), (64, 8, 2, 1), (128, 4, 2, 1),
            (128, 8, 2, 1), (128, 8, 3, 1), (32, 4, 2, 1), (32, 2, 3, 1), (64, 2, 2, 1)]  # fmt: skip
    for block, warps, stages, splits in grid:
        name = f"triton block {block}, {warps} warps, {stages} stages, {splits} split(s)"
        variants[name] = triton_variant(q, buf, w, starts, ends, scale, splits, block=block, warps=warps, stages=stages)
    print(f"\n== one layer's decode attention: {rows} rows x {kv_heads} KV heads x {group} queries x {dim}")
    for name, fn in variants.items():
        if fn is None:
            continue
        try:
            ms = cuda_ms(fn)
            err = (fn().float() - reference).abs().max().item() if "whole" not in name else float("nan")
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"{name:45s} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        live = 2 * rows * kv_heads * (context + 1) * dim * 2
        print(f"{name:45s} {ms * 1e3:8.1f} us  {live / ms / 1e6:7.0f} GB/s of live K/V  max|diff| {err:.1e}")


def triton_variant(q, buf, w, starts, ends, scale, splits, **launch):  # noqa: ANN001, ANN003, ANN201
    from policies.engine.triton_decode import decode_attention

    rows, kv_heads, group, dim = q.shape
    heads = q.reshape(rows, kv_heads * group, 1, dim)  # the engine's layout: head h = kv_head * group + g

    def run() -> torch.Tensor:
        out = decode_attention(heads, buf[0, :, :, :w], buf[1, :, :, :w], starts, ends, scale, splits, **launch)
        return out.reshape(rows, kv_heads, group, dim)

    return run


def flex_variant(q, buf, w, starts, ends, scale):  # noqa: ANN001, ANN201
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    rows, kv_heads, group, dim = q.shape

    def keep(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        return (kv_idx >= starts[b]) & (kv_idx <= ends[b])

    t0 = time.perf_counter()
    block = create_block_mask(keep, B=rows, H=None, Q_LEN=1, KV_LEN=w, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    k, v = buf[0, :, :, :w], buf[1, :, :, :w]
    qh = q.reshape(rows, kv_heads * group, 1, dim)

    def run() -> torch.Tensor:
        return compiled(qh, k, v, block_mask=block, scale=scale, enable_gqa=True).reshape(rows, kv_heads, group, dim)

    run()
    print(f"(flex_attention compiled in {time.perf_counter() - t0:.1f} s)")
    return run


def samplers(rows: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(rows, 151936, device="cuda", generator=g) * 3).to(torch.bfloat16)
    print(f"\n== sampling one token per row from [{rows}, 151936] bf16 logits (temperature 1)")
    for name, env in (("torch (sampling.sample)", "torch"), ("triton kernel (triton_sample.py)", "triton")):
        os.environ[sampling.SAMPLER_ENV] = env
        sampling._kernel_available.cache_clear()
        params = [RowParams(1.0, 1.0, -1, make_generator(1.0, k)) for k in range(rows)]
        sampling.sample(logits, params)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            got = sampling.sample(logits, params)
        ms = (time.perf_counter() - t0) / 20 * 1e3
        print(f"{name:35s} {ms:7.3f} ms per call; tokens {got.tokens[:4]}")
    os.environ.pop(sampling.SAMPLER_ENV)
    sampling._kernel_available.cache_clear()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--context", type=int, default=600)
    p.add_argument(
        "--old", action="store_true", help="the first session's profile (whole buffer vs bucket, SDPA variants)"
    )
    p.add_argument("--no-flex", action="store_true")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    model = random_model(qwen3_06b(args.context + 64))
    if args.old:
        runner = ModelRunner(model, device=torch.device("cuda"))
        for full_width in (True, False):
            profile_steps(runner, args.rows, args.context, full_width, "whole buffer" if full_width else "bucket", True)
        runner.release_memory()
    else:
        configs = [("eager layers, torch sampler", "0", "torch"), ("compiled layers, torch sampler", "1", "torch"),
                   ("compiled layers, triton sampler (default)", "1", "triton")]  # fmt: skip
        for i, (label, compiled, sampler) in enumerate(configs):
            os.environ["ASYNCRL_ENGINE_COMPILE"], os.environ[sampling.SAMPLER_ENV] = compiled, sampler
            sampling._kernel_available.cache_clear()
            t0 = time.perf_counter()
            runner = ModelRunner(model, device=torch.device("cuda"))
            profile_steps(runner, args.rows, args.context, False, label, table=i == len(configs) - 1)
            print(f"({time.perf_counter() - t0:.1f} s with compiles and captures)")
            runner.release_memory()
            del runner
        for key in ("ASYNCRL_ENGINE_COMPILE", sampling.SAMPLER_ENV):
            os.environ.pop(key)
        sampling._kernel_available.cache_clear()
    del model
    torch.cuda.empty_cache()
    attention_variants(args.rows, args.context, not args.no_flex, args.old)
    samplers(args.rows)


if __name__ == "__main__":
    main()
