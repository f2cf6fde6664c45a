"""LoRA against full fine-tuning on one GPU, Qwen3-0.6B's shape (random weights): learner peak
memory and step time, and the bytes one weight sync sends (issue 22's LoRA figures).

    python benchmarks/lora_gpu.py [--samples 32 --tokens 384 --rank 16]

Both learners are ``PolicyTrainer`` (fp32 master weights, bf16 autocast) stepping the same batch,
one after the other in this process (peak memory reset in between); LoRA on every linear layer
(peft's ``all-linear``). Sync bytes: the files ``save_weights`` writes for the engines (the
adapter in peft's format, else every weight), and the bf16 size of the full weights, which the
collective transports send.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buffers.types import Group, Prompt, Sample, Status  # noqa: E402
from policies.lora import LoraSpec  # noqa: E402
from policies.model import qwen3_config, write_random_checkpoint  # noqa: E402
from policies.tokenizer import word_tokenizer  # noqa: E402
from policies.trainer import PolicyTrainer  # noqa: E402
from runtime.config import GrpoConfig, OptimizerConfig  # noqa: E402

VOCAB = 151936


def batch(samples: int, tokens: int, seed: int = 0) -> list[Group]:
    g = torch.Generator().manual_seed(seed)
    prompt_len = tokens // 4
    groups = []
    for gid in range(samples // 4):
        out = []
        for i in range(4):
            ids = torch.randint(3, VOCAB, (tokens,), generator=g).tolist()
            s = Sample(group_id=gid, index=i, prompt_ids=ids[:prompt_len])
            s.add_segment(ids[prompt_len:], [-1.0] * (tokens - prompt_len), 0)
            s.status, s.reward = Status.COMPLETED, float(i % 2)
            out.append(s)
        groups.append(Group(group_id=gid, prompt=Prompt(gid, out[0].prompt_ids), samples=out, admitted_version=0,
                            deadline_version=1))
    return groups


def measure(path: Path, groups: list[Group], lora: LoraSpec | None, steps: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer = PolicyTrainer(path, grpo=GrpoConfig(), optim=OptimizerConfig(lr=1e-5), temperature=1.0, pad_id=0,
                            device="cuda", lora=lora)
    times = []
    for v in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.step(groups, version=v)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        out = trainer.save_weights(Path(d) / "w")
        save_s = time.perf_counter() - t0
        files = sum(f.stat().st_size for f in out.iterdir())
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = {"mode": "lora" if lora else "full", "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
              "step_s": statistics.median(times[1:] or times), "trainable_params": trainable,
              "sync_file_bytes": files, "save_s": save_s, "full_bf16_bytes": trainer.full_bytes // 2}
    del trainer
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--tokens", type=int, default=384)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tok = word_tokenizer(["a"])
        cfg = qwen3_config(vocab_size=VOCAB, num_layers=28, hidden_size=1024, num_attention_heads=16,
                           num_query_groups=8, ffn_hidden_size=3072, max_position_embeddings=4096, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2)
        cfg.head_dim = 128
        path = write_random_checkpoint(Path(d) / "m", cfg, tok, seed=0)
        groups = batch(a.samples, a.tokens)
        rows = [measure(path, groups, None, a.steps),
                measure(path, groups, LoraSpec(rank=a.rank, alpha=2.0 * a.rank), a.steps)]
    print(f"{'mode':6} {'peak GiB':>9} {'step s':>7} {'trainable':>12} {'sync bytes':>12} {'save s':>7} "
          f"{'full bf16 bytes':>16}")
    for r in rows:
        print(f"{r['mode']:6} {r['peak_gib']:9.1f} {r['step_s']:7.3f} {r['trainable_params']:12,d} "
              f"{r['sync_file_bytes']:12,d} {r['save_s']:7.2f} {r['full_bf16_bytes']:16,d}")
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "samples": a.samples, "tokens": a.tokens,
                      "rank": a.rank, "rows": rows}))


if __name__ == "__main__":
    main()
