"""Policy-loss pieces: small pure functions over per-token tensors of shape (batch, tokens).

``mask`` is 1.0 where a token is trained. Every function leaves masked-out positions at zero or
excludes them from means. Reductions happen in ``masked_mean`` only.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def ppo_clip(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, *, eps_low: float,
             eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss and a 0/1 tensor marking where the clip was active.

    ``adv`` broadcasts against the token axis (shape (batch, 1) for sequence-level advantages).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).float()


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate of the policy from the reference (Schulman's k1/k2/k3 estimators)."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "low_var_kl":  # k3, clamped as is customary for stability
        return (torch.exp(-log_ratio) - 1 + log_ratio).clamp(max=10.0)
    raise ValueError(f"unknown KL estimator {kind!r}")
