"""The learning rate as a function of the optimizer step: Megatron's schedule, which Miles uses.

``at(step)`` is the learning rate of the optimizer step taken at policy version ``step`` (steps
already taken). Linear warm-up from 0 over ``warmup_iters`` steps, then ``constant`` (the peak
``lr``), or a ``linear`` / ``cosine`` decay from ``lr`` to ``min_lr`` ending at ``decay_iters``,
then ``min_lr``. As in Megatron (and transformers' schedulers) the first warm-up step has rate 0.

Why a pure function and not ``torch.optim.lr_scheduler``: the rate is a function of the policy
version, which every checkpoint already restores, so a resumed run cannot drift from the run it
continues; a scheduler object would be a second step counter to save and keep in agreement.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec
import torch


class LrSchedule(msgspec.Struct, frozen=True, kw_only=True):
    lr: float  # the peak
    min_lr: float = 0.0
    style: Literal["constant", "linear", "cosine"] = "constant"
    warmup_iters: int = 0
    decay_iters: int | None = None  # the step the decay ends at; None: no decay (constant after warm-up)

    def __post_init__(self) -> None:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}")
        if self.style != "constant" and self.decay_iters is not None and self.decay_iters <= self.warmup_iters:
            raise ValueError(f"decay_iters {self.decay_iters} must be above warmup_iters {self.warmup_iters}")

    def at(self, step: int) -> float:
        if self.warmup_iters > 0 and step <= self.warmup_iters:
            return self.lr * step / self.warmup_iters
        if self.style == "constant" or self.decay_iters is None:
            return self.lr
        if step > self.decay_iters:
            return self.min_lr
        ratio = (step - self.warmup_iters) / (self.decay_iters - self.warmup_iters)
        coeff = 1.0 - ratio if self.style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.lr - self.min_lr)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every parameter group's rate for the step at ``step``; returns it."""
        lr = self.at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
