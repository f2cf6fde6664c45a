"""The learner at real scale: one optimizer step of the old trainer and the new one, side by side.

Model: Qwen3-0.6B's shape (hidden 1024, 28 layers, 16 heads, 8 KV heads, head_dim 128, FFN 3072,
vocab 151936, tied head), random init, fp32 master weights under bf16 autocast. Batches: ``n``
samples of ``L`` tokens each (a 128-token prompt, the rest a trained response), rewards random.

- old: main's step before issue 14 (kept here, ``old_step``): the batch right-padded, one
  forward/backward, full-vocabulary fp32 logits, log_softmax and its exp for the entropy.
- new: ``PolicyTrainer.step`` with ``--use-dynamic-batch-size --max-tokens-per-gpu`` (and the
  recompute setting of the row): packed micro-batches, varlen attention, chunked log-probs.

Per run: peak GPU memory (``max_memory_allocated``) and tokens/s over ``--steps`` timed steps
after one warm-up step; "OOM" when it runs out of memory. MFU counts 6 x (non-embedding matmul
parameters + the output head) per token plus causal attention, 6 x 2 x L x (heads x head_dim)
per token per layer (half of the full L x L, fwd + bwd = 3 x fwd), over the H200's dense bf16 peak
(989 TFLOP/s); recomputed forwards are not counted (they are overhead, not model FLOPs).

    python benchmarks/learner_scale.py                     # the issue's table (one H200)
    python benchmarks/learner_scale.py --tiny --device cpu # the script itself, in seconds
"""

from __future__ import annotations

import argparse
import functools
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from buffers.types import Group, Prompt, Sample, Status
from policies import packed_attention
from policies.advantages import grpo_advantages
from policies.loss import masked_mean, ppo_clip
from policies.packing import collate
from policies.trainer import PolicyTrainer, recompute
from runtime.config import GrpoConfig, OptimizerConfig

QWEN3_06B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072, vocab_size=151936)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=1000)
SHAPES = [(32, 1152), (32, 4096), (256, 1024), (8, 16384)]
TINY_SHAPES = [(4, 96), (4, 160), (16, 64), (2, 256)]
PROMPT = 128
PEAK_FLOPS = 989e12  # H200 dense bf16


def old_step(trainer: PolicyTrainer, batch: list[Group], version: int) -> None:
    """main's ``PolicyTrainer.step`` before issue 14 (no TIS, no KL), verbatim in what costs memory."""
    samples, advs = [], []
    for g in batch:
        advs += grpo_advantages(g.rewards, [s.trainable for s in g.samples])
        samples += g.samples
    tb = collate(samples, advs, trainer.pad_id, version=version).to(trainer.device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=trainer.device.type == "cuda"):
        out = trainer.model(input_ids=tb.input_ids, attention_mask=tb.attention_mask)
    logits = out.logits[:, :-1].float()
    logp_all = torch.log_softmax(logits / trainer.temperature, dim=-1)
    logp = logp_all.gather(-1, tb.input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    pg, _ = ppo_clip(logp, logp.detach(), tb.advantages, eps_low=0.2, eps_high=0.2)
    loss = masked_mean(pg, tb.mask)
    masked_mean(entropy, tb.mask).item()
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
    trainer.optimizer.step()


def make_batch(n: int, length: int, vocab: int, seed: int) -> list[Group]:
    rng, prompt_len = random.Random(seed), min(PROMPT, length // 4)
    groups = []
    for gid in range(0, n, 8):
        prompt = [rng.randrange(3, vocab) for _ in range(prompt_len)]
        samples = []
        for i in range(min(8, n - gid)):
            s = Sample(group_id=gid, index=i, prompt_ids=prompt)
            response = [rng.randrange(3, vocab) for _ in range(length - prompt_len)]
            s.add_segment(response, [-5.0] * len(response), 0)
            s.status, s.reward = Status.COMPLETED, float(rng.random() < 0.5)
            samples.append(s)
        groups.append(Group(group_id=gid, prompt=Prompt(gid, prompt), samples=samples, admitted_version=0,
                            deadline_version=0))
    return groups


def model_flops_per_token(cfg: dict, length: int) -> float:
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * cfg["intermediate_size"]
    params = layers * per_layer + h * cfg["vocab_size"]
    attention = layers * 2 * 2 * q * length / 2  # QK^T and AV, causal: half of L x L, per token, forward
    return 6 * params + 3 * attention


def measure(run: Callable[[], object], steps: int, device: torch.device, tokens: int) -> tuple[str, str, float]:
    """(peak GB, tokens/s, seconds per step) of ``run()``, or "OOM"."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        run()  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        sync()
    except torch.OutOfMemoryError:
        return "OOM", "OOM", 0.0
    dt = (time.perf_counter() - t0) / steps
    peak = f"{torch.cuda.max_memory_allocated() / 1e9:.1f}" if device.type == "cuda" else "-"
    return peak, f"{tokens / dt:,.0f}", dt


def check_packed(trainer: PolicyTrainer, vocab: int) -> str:
    """Max |log-prob difference| of the packed path (as run) against the padded model with SDPA, and
    against the per-sequence SDPA path, on 8 samples of uneven lengths: bf16-level is expected."""
    batch = make_batch(8, 512, vocab, seed=1)
    for i, s in enumerate(batch[0].samples):  # uneven lengths: cut responses
        del s.response_ids[512 - 128 - 37 * i:], s.behavior_logprobs[512 - 128 - 37 * i:]
        del s.token_versions[512 - 128 - 37 * i:], s.loss_mask[512 - 128 - 37 * i:]
    samples = batch[0].samples
    tb = collate(samples, [0.0] * len(samples), 0, version=0)
    valid = tb.attention_mask[:, 1:].bool()
    packed, _ = trainer.token_logprobs(tb)
    saved, packed_attention._VARLEN = packed_attention._VARLEN, None
    per_sequence, _ = trainer.token_logprobs(tb)
    packed_attention._VARLEN = saved
    trainer.model.set_attn_implementation("sdpa")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=trainer.device.type == "cuda"):
        logits = trainer.model(input_ids=tb.input_ids.to(trainer.device),
                               attention_mask=tb.attention_mask.to(trainer.device)).logits[:, :-1].float().cpu()
    trainer.model.set_attn_implementation(packed_attention.NAME)
    padded = torch.log_softmax(logits, -1).gather(-1, tb.input_ids[:, 1:, None])[..., 0]
    return (f"packed vs padded max |dlogp| {(packed - padded)[valid].abs().max():.3g}, "
            f"vs per-sequence SDPA {(packed - per_sequence)[valid].abs().max():.3g}")


def check_varlen_grad(device: torch.device) -> str:
    """varlen_attn's output and gradients against per-sequence SDPA on random bf16 inputs; on any
    error the per-sequence path is used for the whole run (and the error printed)."""
    if packed_attention._VARLEN is None or device.type != "cuda":
        return "varlen_attn not used"
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, h, 300, 128, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
               for h in (16, 8, 8))
    cu = torch.tensor([0, 100, 170, 300], dtype=torch.int32, device=device)
    results = []
    try:
        for varlen in (packed_attention._VARLEN, None):
            saved, packed_attention._VARLEN = packed_attention._VARLEN, varlen
            out, _ = packed_attention.packed_attention(torch.nn.Module(), q, k, v, None, scaling=128 ** -0.5,
                                                       cu_seq_lens_q=cu, max_length_q=130)
            packed_attention._VARLEN = saved
            results.append((out, *torch.autograd.grad(out.float().square().sum(), (q, k, v))))
    except Exception as e:  # noqa: BLE001 - reported, and the run goes on without varlen
        packed_attention._VARLEN = None
        return f"varlen_attn failed ({type(e).__name__}: {str(e)[:200]}): SDPA per sequence for this run"
    diffs = [f"{(a.float() - b.float()).abs().max():.3g}" for a, b in zip(*results)]
    return f"varlen_attn vs per-sequence SDPA, max |diff| of out, dq, dk, dv: {', '.join(diffs)}"


def configure(trainer: PolicyTrainer, variant: str) -> str:
    """``variant``: "old", or a token budget with an "r" suffix for activation recompute ("16384r")."""
    if variant == "old":
        trainer.model.set_attn_implementation("sdpa")
        recompute(trainer.model, False)
        return "old (main)"
    trainer.model.set_attn_implementation(packed_attention.NAME)
    trainer.max_tokens = int(variant.rstrip("r"))
    recompute(trainer.model, variant.endswith("r"))
    return f"new, {trainer.max_tokens:,} tokens/micro-batch{', recompute' if variant.endswith('r') else ''}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and batches: checks the script")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per run, after one warm-up step")
    ap.add_argument("--variants", default="",
                    help="comma-separated: old, or a --max-tokens-per-gpu budget, suffix r: with recompute "
                         "(default 16384,16384r,8192,old; --tiny: 256,256r,128,old)")
    args = ap.parse_args()
    cfg, shapes = (TINY, TINY_SHAPES) if args.tiny else (QWEN3_06B, SHAPES)
    variants = args.variants or ("256,256r,128,old" if args.tiny else "16384,16384r,8192,old")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(Qwen3Config(**cfg, max_position_embeddings=32768,
                                                                 tie_word_embeddings=True))
        model.save_pretrained(Path(tmp))
        del model
        trainer = PolicyTrainer(tmp, grpo=GrpoConfig(), optim=OptimizerConfig(lr=1e-6), temperature=1.0, pad_id=0,
                                device=args.device)
        varlen = packed_attention._VARLEN is not None and device.type == "cuda"
        print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
              f"packed attention: {'torch varlen_attn' if varlen else 'SDPA per sequence'}")
        print(check_varlen_grad(device), flush=True)
        print(check_packed(trainer, cfg["vocab_size"]), flush=True)
        print("| batch | trainer | peak GB | tokens/s | s/step | MFU |")
        print("|---|---|---|---|---|---|")
        for n, length in shapes:
            batch = make_batch(n, length, cfg["vocab_size"], seed=n * length)
            for variant in variants.split(","):
                label = configure(trainer, variant)
                step = old_step if variant == "old" else PolicyTrainer.step
                peak, tps, dt = measure(functools.partial(step, trainer, batch, 0), args.steps, device, n * length)
                mfu = n * length * model_flops_per_token(cfg, length) / dt / PEAK_FLOPS if dt else 0.0
                print(f"| {n} x {length:,} | {label} | {peak} | {tps} | {dt:.2f} | {f'{mfu:.0%}' if dt else '-'} |",
                      flush=True)
                trainer.optimizer.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
