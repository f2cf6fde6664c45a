"""The Megatron learner on one GPU beside the HF learner, a Qwen3-0.6B-shaped random model.

    python benchmarks/megatron_gpu.py [--out DIR] [--shapes 32x1152,32x4096,256x1024,8x16384]
                                      [--max-tokens-per-gpu 16384] [--tiny]   # --tiny: CPU smoke run

(a) parity: one optimizer step of each learner on the same weights and batch (8 x 512 tokens,
    bf16 autocast over fp32 weights in both): loss, entropy, grad norm, and per-tensor gradient
    relative error and cosine (HF names; megatron's fp32 ``main_grad`` against HF's ``.grad``);
(b) tokens/s and peak GPU memory of one step at each shape (samples x tokens), each learner,
    after a warm-up step; an out-of-memory is reported as such.
Prints a table and writes it to DIR/megatron_gpu.md (and DIR/megatron_gpu.json).

On the lent GPU machine the image has no megatron-core: the carried ``.whl`` must hold it
(``bash ../shared/device/wheels.sh megatron-core==0.16.1``; the device tool carries the session
checkout's ``.whl``), then ``PYTHONPATH=/tmp/site:$PWD python3 benchmarks/megatron_gpu.py --out $OUT``.
First run on the lent H200 on 2026-12-03: BENCHMARKS.md, results/megatron_gpu/.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buffers.types import Group, Prompt, Sample, Status  # noqa: E402
from policies.megatron import convert  # noqa: E402
from policies.megatron.model import Parallelism  # noqa: E402
from policies.megatron.trainer import MegatronTrainer  # noqa: E402
from policies.model import qwen3_config  # noqa: E402
from policies.trainer import PolicyTrainer  # noqa: E402
from runtime.config import GrpoConfig, OptimizerConfig  # noqa: E402

GRPO = GrpoConfig(use_tis=True)
OPTIM = OptimizerConfig(lr=1e-6)


def model_config(tiny: bool):
    if tiny:
        return qwen3_config(vocab_size=512, num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=128, max_position_embeddings=20000, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2)
    cfg = qwen3_config(vocab_size=151936, num_layers=28, hidden_size=1024, num_attention_heads=16, num_query_groups=8,
                       ffn_hidden_size=3072, max_position_embeddings=40960, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)
    cfg.head_dim = 128  # Qwen3-0.6B: 16 heads x 128 > hidden 1024
    cfg.rope_parameters = {"rope_theta": 1000000.0, "rope_type": "default"}
    return cfg


def batch(n: int, length: int, vocab: int, seed: int, group: int = 8) -> list[Group]:
    rng = random.Random(seed)
    groups = []
    for g in range(max(n // group, 1)):
        prompt = [rng.randrange(3, vocab) for _ in range(min(64, length // 2))]
        samples = []
        for i in range(min(group, n)):
            s = Sample(group_id=g, index=i, prompt_ids=prompt)
            # lengths differ within a group, so the GRPO loss is not ~0 by symmetry
            resp = [rng.randrange(3, vocab) for _ in range(length - len(prompt) - rng.randrange(0, length // 8))]
            s.add_segment(resp, [-rng.uniform(8, 14) for _ in resp], 0)
            s.status, s.reward = Status.COMPLETED, rng.random()
            samples.append(s)
        groups.append(Group(group_id=g, prompt=Prompt(g, prompt), samples=samples, admitted_version=0,
                            deadline_version=0))
    return groups


def hf_trainer(path, device, max_tokens):
    kw = dict(grpo=GRPO, optim=OPTIM, temperature=1.0, pad_id=0, device=device)
    if "max_tokens_per_gpu" in inspect.signature(PolicyTrainer).parameters:  # issue 14's learner
        kw["max_tokens_per_gpu"] = max_tokens
    return PolicyTrainer(path, **kw)


def parity(path, cfg, device, max_tokens) -> dict:
    data = batch(8, 512, cfg.vocab_size, seed=1)
    hf = hf_trainer(path, device, max_tokens)
    want = hf.step(data, 0)
    hf_grads = {n: p.grad.detach().double() for n, p in hf.model.named_parameters()}
    del hf
    gc.collect()
    torch.cuda.empty_cache() if device == "cuda" else None
    mt = MegatronTrainer(path, grpo=GRPO, optim=OPTIM, temperature=1.0, pad_id=0, device=device,
                         max_tokens_per_gpu=max_tokens)
    got = mt.step(data, 0)
    errs, cos = {}, {}
    for hf_name, t in convert.hf_gradients(mt.model, cfg).items():
        ref = hf_grads[hf_name]
        errs[hf_name] = ((t - ref).norm() / ref.norm().clamp(min=1e-30)).item()
        cos[hf_name] = torch.nn.functional.cosine_similarity(t.flatten(), ref.flatten(), dim=0).item()
    mt.close()
    worst = max(errs, key=errs.get)
    return {"hf": {k: getattr(want, k) for k in ("loss", "entropy", "grad_norm", "tis_mean")},
            "megatron": {k: getattr(got, k) for k in ("loss", "entropy", "grad_norm", "tis_mean")},
            "grad_rel_err_max": errs[worst], "grad_rel_err_worst_tensor": worst,
            "grad_rel_err_median": sorted(errs.values())[len(errs) // 2], "grad_cos_min": min(cos.values()),
            "tensors_compared": len(errs)}


def throughput(make, shapes, vocab, device) -> dict:
    out = {}
    trainer = make()
    try:
        trainer.step(batch(8, 512, vocab, seed=2), 0)  # warm-up
        for version, (n, length) in enumerate(shapes, start=1):
            key = f"{n}x{length}"
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            data = batch(n, length, vocab, seed=3 + version)
            t0 = time.perf_counter()
            try:
                trainer.step(data, version)
                if device == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
                out[key] = {"tokens_per_s": n * length / dt, "seconds": dt, "peak_gib": peak}
            except torch.cuda.OutOfMemoryError:
                out[key] = {"oom": True}
                gc.collect()
                torch.cuda.empty_cache()
            print(key, out[key], flush=True)
        # the resume files, written and read back on this device
        if isinstance(trainer, MegatronTrainer) and not trainer.par.recompute_granularity:
            out["checkpoint"] = guarded(checkpoint_round_trip, trainer)
            print("checkpoint", out["checkpoint"], flush=True)
    finally:
        getattr(trainer, "close", lambda: None)()
        del trainer
        gc.collect()
        torch.cuda.empty_cache() if device == "cuda" else None
    return out


def checkpoint_round_trip(trainer) -> dict:
    """Save (megatron's distributed checkpoint + HF export) and load back; the weights are unchanged."""
    before = {k: v.detach().float().cpu().clone() for k, v in trainer.model.state_dict().items()
              if isinstance(v, torch.Tensor)}
    ckpt = Path(tempfile.mkdtemp())
    trainer.save_checkpoint(ckpt)
    trainer.load_checkpoint(ckpt)
    after = trainer.model.state_dict()
    moved = max((after[k].detach().float().cpu() - v).abs().max().item() for k, v in before.items())
    return {"files": sorted(p.name for p in ckpt.iterdir()), "max_weight_change": moved}


def guarded(fn, *args) -> dict:
    """One section's result, or its error (the run goes on: one device call must tell all)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported in the table
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()))
    ap.add_argument("--shapes", default="32x1152,32x4096,256x1024,8x16384")
    ap.add_argument("--max-tokens-per-gpu", type=int, default=16384)
    ap.add_argument("--learners", default="megatron,megatron_recompute,hf")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    cfg = model_config(args.tiny)
    path = Path(tempfile.mkdtemp()) / "qwen3"
    torch.manual_seed(0)
    with torch.device(device):
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    result["parity"] = guarded(parity, path, cfg, device, args.max_tokens_per_gpu)
    print("parity", json.dumps(result["parity"]), flush=True)
    makers = {"megatron": lambda: MegatronTrainer(path, grpo=GRPO, optim=OPTIM, temperature=1.0, pad_id=0,
                                                  device=device, max_tokens_per_gpu=args.max_tokens_per_gpu),
              "megatron_recompute": lambda: MegatronTrainer(
                  path, grpo=GRPO, optim=OPTIM, temperature=1.0, pad_id=0, device=device,
                  max_tokens_per_gpu=args.max_tokens_per_gpu, parallelism=Parallelism(recompute_granularity="full")),
              "hf": lambda: hf_trainer(path, device, args.max_tokens_per_gpu)}
    for name in args.learners.split(","):
        result[name] = guarded(throughput, makers[name], shapes, cfg.vocab_size, device)
        (args.out / "megatron_gpu.json").write_text(json.dumps(result, indent=1))
    (args.out / "megatron_gpu.json").write_text(json.dumps(result, indent=1))
    lines = ["| shape | " + " | ".join(f"{n} tok/s | {n} peak GiB" for n in args.learners.split(",")) + " |",
             "|---|" + "---|---|" * len(args.learners.split(","))]
    for n, length in shapes:
        key, cells = f"{n}x{length}", []
        for name in args.learners.split(","):
            r = result[name].get(key, {})
            cells += ["OOM", "-"] if r.get("oom") else [f"{r.get('tokens_per_s', 0):,.0f}",
                                                         f"{r.get('peak_gib', 0):.1f}"]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (args.out / "megatron_gpu.md").write_text(table + "\n\n" + json.dumps(result["parity"], indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
