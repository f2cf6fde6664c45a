"""What the trainer reads of the RL objective and the optimizer, as Protocols.

``runtime.config``'s GRPO and OPTIMIZER sections satisfy them structurally; the trainer (layer 2)
names these instead of importing the runtime's config (layer 4), so any object with the fields
will do (a test's, an embedding application's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Objective(Protocol):
    """The GRPO section: the loss (policy or SFT), advantages, PPO clip, importance weight, KL, entropy."""

    loss_type: str  # policy_loss | sft_loss (policies.sft)
    calculate_per_token_loss: bool

    normalize_advantage_std: bool
    eps_clip: float
    eps_clip_high: float | None
    use_tis: bool
    tis_clip: float
    tis_clip_low: float
    tis_level: str
    tis_mode: str
    tis_clip_by_staleness: Sequence[float]
    use_kl_loss: bool
    kl_loss_coef: float
    kl_loss_type: str
    entropy_coef: float


class Optimizer(Protocol):
    """The OPTIMIZER section (AdamW, and the rate's schedule: policies/lr_schedule.py)."""

    lr: float
    min_lr: float
    lr_decay_style: str
    lr_warmup_iters: int
    lr_decay_iters: int | None
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    clip_grad: float
