"""What the trainer reads of the RL objective and the optimizer, as Protocols, and the per-token
policy loss both learners (``policies/trainer.py``, ``policies/megatron/trainer.py``) assemble from it.

``runtime.config``'s GRPO and OPTIMIZER sections satisfy them structurally; the trainer (layer 2)
names these instead of importing the runtime's config (layer 4), so any object with the fields
will do (a test's, an embedding application's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

from policies.correction import importance_weight
from policies.loss import kl_penalty, ppo_clip

if TYPE_CHECKING:
    import torch

    from policies.packing import TokenBatch


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


class PolicyTerms(NamedTuple):
    """The policy loss of each token and the parts the step's figures report; all (batch, tokens)."""

    per_token: torch.Tensor  # the loss, before the mask and the step's normaliser
    clipped: torch.Tensor  # 1 where PPO's clip was active
    weight: torch.Tensor  # the importance weight pi_prox / pi_behavior, bounded (policies.correction)
    bounded: torch.Tensor  # 1 where the weight met its bound
    kl: torch.Tensor | None  # the KL estimate to the reference; None without one


def policy_terms(g: Objective, logp: torch.Tensor, entropy: torch.Tensor, tb: TokenBatch, *,
                 ref_logp: torch.Tensor | None) -> PolicyTerms:
    """PPO-clip on the advantages, importance-weighted with ``--use-tis``, plus the KL penalty to
    ``ref_logp`` (when given) and minus the entropy bonus. One optimizer step per batch, so the
    proximal policy is the current one: its logprobs are ``logp``, detached (policies/trainer.py)."""
    old_logp = logp.detach()
    eps_high = g.eps_clip_high if g.eps_clip_high is not None else g.eps_clip
    pg, clipped = ppo_clip(logp, old_logp, tb.advantages, eps_low=g.eps_clip, eps_high=eps_high)
    w, bounded = importance_weight(old_logp, tb.behavior_logp, tb.mask, tb.staleness, level=g.tis_level,
                                   mode=g.tis_mode, low=g.tis_clip_low, high=g.tis_clip,
                                   caps=g.tis_clip_by_staleness)
    per_token = pg * w if g.use_tis else pg
    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, g.kl_loss_type)
        per_token = per_token + g.kl_loss_coef * kl
    if g.entropy_coef:
        per_token = per_token - g.entropy_coef * entropy
    return PolicyTerms(per_token, clipped, w, bounded, kl)
