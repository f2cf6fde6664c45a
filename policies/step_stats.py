"""One step's figures, and the partial sums they are made from.

A step's micro-batches (on one rank or many) each add their sums over trained tokens into one
``StepSums`` vector; every figure is a ratio of those sums, so adding the vectors of every
micro-batch of every rank (an all-reduce SUM of ``StepSums.values``) and then calling ``stats``
gives exactly the figures of the whole batch trained at once.
"""

from __future__ import annotations

import msgspec
import torch

from policies.correction import BUCKET_SUMS, OLDEST_BUCKET, bucket_figures, bucket_sums

# each a sum over trained tokens; ``loss`` is already divided by the whole step's trained-token
# count (the trainer's normaliser), so it too adds up across micro-batches and ranks
FIELDS = ("loss", "clipped", "weight", "bounded", "kl", "entropy", "tokens", "samples")
SIZE = len(FIELDS) + (OLDEST_BUCKET + 1) * len(BUCKET_SUMS)


class StepStats(msgspec.Struct):
    """One step's figures. The ``tis_*`` figures and ``correction`` describe the bounded importance
    weight as configured whether or not ``--use-tis`` applies it, so a run can see how far off
    policy its data is before turning the correction on."""

    loss: float
    pg_clipfrac: float
    tis_mean: float  # mean bounded weight over trained tokens
    tis_clipfrac: float  # fraction of trained tokens the bound truncated or masked
    kl: float
    entropy: float
    grad_norm: float
    n_tokens: int
    n_samples: int
    lr: float = 0.0  # the learning rate of this step (policies/lr_schedule.py)
    sync_bytes: int = 0  # what one weight sync sends: the adapter with LoRA, else every weight
    full_bytes: int = 0  # what a sync of every weight would send (beside sync_bytes)
    # per staleness bucket, keys like "s0/is_mean" (policies.correction.bucket_stats)
    correction: dict[str, float] = msgspec.field(default_factory=dict)


class StepSums:
    """``values``: a float64 vector of ``SIZE`` partial sums: ``FIELDS``, then the
    ``correction.bucket_sums`` table flattened. Kept on the training device, so a micro-batch adds
    its sums without a device-to-host copy."""

    def __init__(self, values: torch.Tensor | None = None, *, device: torch.device | str = "cpu"):
        self.values = torch.zeros(SIZE, dtype=torch.float64, device=device) if values is None else values

    def add(self, **totals: torch.Tensor | float) -> None:
        for name, value in totals.items():
            self.values[FIELDS.index(name)] += value

    def add_buckets(self, weight: torch.Tensor, bounded: torch.Tensor, staleness: torch.Tensor,
                    mask: torch.Tensor) -> None:
        self.values[len(FIELDS):] += bucket_sums(weight, bounded, staleness, mask).flatten().to(self.values.device)

    def __iadd__(self, other: StepSums) -> StepSums:
        self.values += other.values.to(self.values.device)
        return self

    def stats(self, grad_norm: float, *, lr: float = 0.0, sync_bytes: int = 0, full_bytes: int = 0) -> StepStats:
        v = self.values.detach().cpu()
        total = dict(zip(FIELDS, v[: len(FIELDS)].tolist()))
        n = max(total["tokens"], 1.0)
        return StepStats(
            loss=total["loss"], pg_clipfrac=total["clipped"] / n, tis_mean=total["weight"] / n,
            tis_clipfrac=total["bounded"] / n, kl=total["kl"] / n, entropy=total["entropy"] / n,
            grad_norm=grad_norm, lr=lr, sync_bytes=sync_bytes, full_bytes=full_bytes,
            n_tokens=int(total["tokens"]), n_samples=int(total["samples"]),
            correction=bucket_figures(v[len(FIELDS):].view(OLDEST_BUCKET + 1, len(BUCKET_SUMS))),
        )
