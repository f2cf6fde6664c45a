"""Where does a decode step of the embedded engine's ModelRunner spend its time? In process, one GPU.

    python benchmarks/engine_decode_gpu.py [--rows 128,256,512] [--steps 8] [--repeats 3] [--profile 256]

A Qwen3-0.6B-shaped random model (hidden 1024, 28 layers, 16 heads, 8 KV heads, FFN 3072, vocab
151936, bf16, SDPA) built by the project's own builder (policies.model.qwen3_config, random init
as write_random_checkpoint does), driven through ModelRunner.step the way the scheduler drives it:
ROWS rows (groups of 8 sharing a 20-token prompt, temperature 1, a seed per row) are prefilled
by one step, then decode STEPS tokens each. Per row count it reports ms per decode step:

    step        wall time of ModelRunner.step, nothing else synchronised (what the scheduler sees)
    forward     the model's decode forward (HF's forward, or the runner's SlotDecoder.decode: a CUDA
                graph replay), split run with a sync before and after
    sampling    policies.engine.sampling.sample as called by the runner (split run)
    other       step - forward - sampling in the split run: cache bookkeeping, input tensors, Python

and `churn`: a steady state where every step 1/8 of the rows finish (8 tokens) and as many new
rows join (their prefill runs in the same step), as continuous batching sees it.
A checksum of every sampled token and the sum of the logprobs are printed so that two versions
of the runner can be compared for identical results. `--profile N` prints torch.profiler's top
kernels/ops for a few decode steps at N rows.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from policies.engine import runner as runner_mod
from policies.engine.request import make_generator
from policies.engine.runner import ModelRunner, Row
from policies.engine.sampling import RowParams
from policies.model import qwen3_config

PROMPT_LEN, GROUP = 20, 8


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_runner(device: str, dtype: torch.dtype) -> ModelRunner:
    config = qwen3_config(
        vocab_size=151936, num_layers=28, hidden_size=1024, num_attention_heads=16, num_query_groups=8,
        ffn_hidden_size=3072, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device: seconds instead of a minute on CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = model.eval().requires_grad_(False)
    return ModelRunner(model, device=torch.device(device))


def runner_like(runner: ModelRunner, **kw) -> ModelRunner:  # noqa: ANN003
    """Another runner on the same model (e.g. slot_decode=False: the BatchCache path)."""
    return ModelRunner(runner.model, device=runner.device, **kw)


class Seq:
    def __init__(self, key: int, prompt: list[int], seed: int, top_p: float, top_k: int) -> None:
        self.key, self.prompt, self.out = key, prompt, []
        self.params = RowParams(1.0, top_p, top_k, make_generator(1.0, seed))

    def row(self) -> Row:
        return Row(self.key, self.prompt + self.out, self.params)


class Split:
    """Synchronised timers around the model forward and the sampler (installed only for split runs)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner, self.t = runner, {"forward": 0.0, "sampling": 0.0}
        self._forward, self._sample = runner.model.forward, runner_mod.sample

    def timed(self, name, fn):  # noqa: ANN001, ANN201
        def wrapper(*a, **k):  # noqa: ANN002, ANN003, ANN202
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync()
            self.t[name] += time.perf_counter() - t0
            return out

        return wrapper

    def __enter__(self) -> Split:
        self.runner.model.forward = self.timed("forward", self._forward)
        if getattr(self.runner, "_decoder", None) is not None:  # the slot decode step skips model.forward
            self.runner._decoder.decode = self.timed(
                "forward", type(self.runner._decoder).decode.__get__(self.runner._decoder)
            )
        runner_mod.sample = self.timed("sampling", self._sample)
        return self

    def __exit__(self, *exc: object) -> None:
        del self.runner.model.forward
        if getattr(self.runner, "_decoder", None) is not None:
            del self.runner._decoder.decode
        runner_mod.sample = self._sample


def make_seqs(n: int, rng: random.Random, keys: list[int], top_p: float, top_k: int) -> list[Seq]:
    seqs = []
    for g in range(0, n, GROUP):
        prompt = [1] + [rng.randrange(3, 151936) for _ in range(PROMPT_LEN - 1)]
        for _ in range(min(GROUP, n - g)):
            keys[0] += 1
            seqs.append(Seq(keys[0], prompt, seed=keys[0], top_p=top_p, top_k=top_k))
    return seqs


def advance(runner: ModelRunner, seqs: list[Seq], check: list[int]) -> float:
    sync()
    t0 = time.perf_counter()
    tokens, logprobs, _ = runner.step([s.row() for s in seqs])
    dt = time.perf_counter() - t0
    for s, t in zip(seqs, tokens, strict=True):
        s.out.append(t)
    check[0] = (check[0] * 1000003 + sum((i + 1) * t for i, t in enumerate(tokens))) % (1 << 61)
    check[1] += float(sum(logprobs))
    return dt


def decode_run(runner: ModelRunner, n: int, steps: int, seed: int, args, check: list[int]):  # noqa: ANN001
    """Prefill n rows, then `steps` decode steps; returns the decode steps' wall times."""
    runner.drop_cache()
    seqs = make_seqs(n, random.Random(seed), [seed * 100_000], args.top_p, args.top_k)
    advance(runner, seqs, check)  # prefill
    return [advance(runner, seqs, check) for _ in range(steps)]


def churn_run(runner: ModelRunner, n: int, steps: int, seed: int, args, check: list[int]) -> list[float]:
    """Rows staggered so that 1/8 of them finish every step and as many join (prefill + decode mixed)."""
    runner.drop_cache()
    rng, keys, per = random.Random(seed), [seed * 100_000 + 50_000], max(GROUP, n // 8)
    live: list[Seq] = []
    times = []
    for i in range(8 + steps):
        live = [s for s in live if len(s.out) < 8]
        live += make_seqs(min(per, n - len(live)), rng, keys, args.top_p, args.top_k)
        dt = advance(runner, live, check)
        if i >= 8:
            times.append(dt)
    return times


def table(runner: ModelRunner, args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    check = [0, 0.0]
    decode_run(runner, 64, 3, 999, args, [0, 0.0])  # warm-up (cuBLAS handles, allocator, graphs)
    for n in (int(x) for x in args.rows.split(",")):
        decode_run(runner, n, 2, 998, args, [0, 0.0])
        churn_run(runner, n, 8, 997, args, [0, 0.0])
    print(f"(warm-up took {time.perf_counter() - t0:.1f} s)")
    header = f"{'rows':>5} {'step ms':>8} {'min':>6} {'forward':>8} {'sampling':>9} {'other':>6} {'churn ms':>9}"
    lines = [header]
    for n in (int(x) for x in args.rows.split(",")):
        wall = [t for r in range(args.repeats) for t in decode_run(runner, n, args.steps, r, args, check)]
        with Split(runner) as split:
            split_wall = [t for r in range(args.repeats) for t in decode_run(runner, n, args.steps, r, args, [0, 0.0])]
        # the split run's prefill steps are timed too: subtract them, timed by a second split
        with Split(runner) as pre:
            for r in range(args.repeats):
                runner.drop_cache()
                seqs = make_seqs(n, random.Random(r), [r * 100_000], args.top_p, args.top_k)
                advance(runner, seqs, [0, 0.0])
        k = args.repeats * args.steps
        fwd = (split.t["forward"] - pre.t["forward"]) / k
        smp = (split.t["sampling"] - pre.t["sampling"]) / k
        other = sum(split_wall) / k - fwd - smp
        churn = churn_run(runner, n, args.steps * args.repeats, 7, args, check)
        lines.append(
            f"{n:5d} {statistics.median(wall) * 1e3:8.2f} {min(wall) * 1e3:6.2f} {fwd * 1e3:8.2f} {smp * 1e3:9.2f}"
            f" {other * 1e3:6.2f} {statistics.median(churn) * 1e3:9.2f}"
        )
    print("\n".join(["ms per decode step (median over steps; split columns are means)", *lines]))
    print(f"checksum tokens {check[0]:x}  sum logprobs {check[1]:.6f}")


def check_against_reference(runner: ModelRunner, n: int, args: argparse.Namespace) -> None:
    """Teacher-forced: each row's logprobs from the runner against one full forward of its final sequence."""
    runner.drop_cache()
    seqs = make_seqs(n, random.Random(42), [4_200_000], args.top_p, args.top_k)
    logprobs = [[] for _ in seqs]
    for _ in range(args.steps + 1):
        tokens, lps, _ = runner.step([s.row() for s in seqs])
        for s, t, lp, out in zip(seqs, tokens, lps, logprobs, strict=True):
            s.out.append(t)
            out.append(lp)
    with torch.inference_mode():
        ids = torch.tensor([s.prompt + s.out for s in seqs], device=runner.device)  # equal lengths: no padding
        ref = torch.log_softmax(runner.model(input_ids=ids).logits[:, PROMPT_LEN - 1 : -1].float(), -1)
        ref = ref.gather(-1, ids[:, PROMPT_LEN:, None])[..., 0].cpu()
    got = torch.tensor(logprobs, dtype=torch.float64)
    diff = (got - ref.double()).abs()
    print(
        f"check vs one full forward, {n} rows x {args.steps + 1} tokens: max |dlogprob| first token (prefill)"
        f" {diff[:, 0].max():.2e}, decode tokens {diff[:, 1:].max():.2e} (mean {diff[:, 1:].mean():.2e})"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="128,256,512")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--profile", type=int, default=0, help="profile decode steps at this many rows")
    p.add_argument("--device", default="cuda")
    p.add_argument("--compare-old", action="store_true", help="also time the BatchCache path (slot_decode=False)")
    p.add_argument("--check", type=int, default=0, help="rows for a teacher-forced check against a full forward")
    args = p.parse_args()
    import transformers

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {gpu}")
    runner = build_runner(args.device, torch.bfloat16)
    print(f"attention: {runner.model.config._attn_implementation}, top_p {args.top_p}, top_k {args.top_k}")
    runners = {"default": runner}
    if args.compare_old:
        runners["batch-cache"] = runner_like(runner, slot_decode=False)
    for name, r in runners.items():
        decoder = getattr(r, "_decoder", None)
        print(f"\n== {name} path: {type(r._cache).__name__}, decoder {type(decoder).__name__}")
        table(r, args)
        if decoder is not None:
            print(f"cuda graphs: {decoder.cuda_graphs}, buckets captured {sorted(decoder._graphs)}")
        if args.check:
            check_against_reference(r, args.check, args)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        runner.drop_cache()
        seqs = make_seqs(args.profile, random.Random(5), [5 * 100_000], args.top_p, args.top_k)
        advance(runner, seqs, [0, 0.0])
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(4):
                advance(runner, seqs, [0, 0.0])
            wall = (time.perf_counter() - t0) / 4
        ka = prof.key_averages()
        gpu_ms = sum(e.self_device_time_total for e in ka if e.device_type == torch.autograd.DeviceType.CUDA) / 4e3
        print(
            f"\nprofile, {args.profile} rows, 4 decode steps: wall {wall * 1e3:.2f} ms/step (profiled),"
            f" GPU kernel time {gpu_ms:.2f} ms/step"
        )
        print(ka.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
        print(ka.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
