"""Off-policy correction of decoupled PPO (AReaL): the importance weight pi_prox / pi_behavior.

The engine that sampled a token (behavior policy, its logprob recorded per token) differs from the
learner's proximal policy (the learner's logprobs before the step) by numerics and by staleness.
The PPO ratio stays against pi_prox; this weight, detached, multiplies each token's loss to
correct for the gap. Three independent choices, one small function each:

- level: ``token`` weights a token by its own ratio; ``sequence`` by the product of the ratios of
  its sequence's trained tokens (what a sequence-level reward calls for; high variance);
  ``geometric`` by that product's geometric mean (exp of the mean log-ratio; length-normalised).
- bound: ``truncate`` clamps into [low, high] (TIS); ``mask`` sets the weight to 0 outside it
  (MIS, icepop): a token too far off-policy contributes nothing instead of a capped amount.
- staleness: the upper bound may tighten with a token's staleness (``upper_bound`` has the rule).

Tensors are (batch, tokens), aligned as in the trainer; ``mask`` is 1.0 on trained tokens and
``staleness`` is the learner's version minus each token's version (long, >= 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

Level = Literal["token", "sequence", "geometric"]
Mode = Literal["truncate", "mask"]
OLDEST_BUCKET = 4  # staleness buckets s0..s3 are exact; s4+ pools everything older


def log_ratio(prox_logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor,
              level: Level) -> torch.Tensor:
    """log(pi_prox / pi_behavior) per token at ``level``; a sequence's value repeats on its tokens.

    Untrained positions count as log-ratio 0, so they never enter a sequence's sum or mean.
    """
    d = (prox_logp - behavior_logp).detach() * mask
    if level == "token":
        return d
    total = d.sum(-1, keepdim=True)
    if level == "geometric":
        total = total / mask.sum(-1, keepdim=True).clamp(min=1.0)
    elif level != "sequence":
        raise ValueError(f"unknown importance-weight level {level!r}")
    return total.expand_as(d)


def upper_bound(staleness: torch.Tensor, mask: torch.Tensor, level: Level, *, caps: Sequence[float],
                default: float) -> torch.Tensor:
    """The upper bound of each token's weight (float64).

    Rule: with no ``caps`` every token gets ``default`` (``--tis-clip``). Otherwise a token of
    staleness ``s`` gets ``caps[min(s, len(caps) - 1)]``: index 0 is fresh data and the last cap
    covers anything at least that stale, e.g. [2.0, 1.5, 1.2]. A sequence or geometric weight is
    one number per sequence, so it is bounded by the cap of the sequence's stalest trained token.
    """
    if not caps:
        return torch.full(staleness.shape, default, dtype=torch.float64, device=staleness.device)
    s = staleness * (mask > 0)
    if level != "token":
        s = s.amax(-1, keepdim=True).expand_as(s)
    return torch.tensor(list(caps), dtype=torch.float64, device=s.device)[s.clamp(0, len(caps) - 1)]


def outside(w: torch.Tensor, low: float, high: torch.Tensor) -> torch.Tensor:
    """True where ``w`` leaves the closed interval [low, high]: where a bound acts."""
    return (w < low) | (w > high)


def truncate(w: torch.Tensor, low: float, high: torch.Tensor) -> torch.Tensor:
    """TIS: clamp into [low, high]."""
    return torch.minimum(w.clamp(min=low), high.to(w.dtype))


def mask_outside(w: torch.Tensor, low: float, high: torch.Tensor) -> torch.Tensor:
    """MIS / icepop: keep ``w`` inside [low, high], 0 outside (the token drops out of the loss)."""
    return torch.where(outside(w, low, high), torch.zeros_like(w), w)


def importance_weight(prox_logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor,
                      staleness: torch.Tensor, *, level: Level, mode: Mode, low: float, high: float,
                      caps: Sequence[float] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """The bounded weight per token, and a bool tensor marking the tokens its bound acted on.

    ``high`` is the upper bound when ``caps`` is empty (see ``upper_bound``). An overflowing
    sequence product (exp -> inf) is still bounded: truncated to the cap, or masked to 0.
    """
    w = torch.exp(log_ratio(prox_logp, behavior_logp, mask, level))
    hi = upper_bound(staleness, mask, level, caps=caps, default=high)
    bound = {"truncate": truncate, "mask": mask_outside}[mode]
    return bound(w, low, hi), outside(w, low, hi)


def effective_sample_size(w: torch.Tensor) -> float:
    """(sum w)^2 / (n sum w^2): 1.0 for equal weights, 1/n when one weight dominates, 0 if all are 0."""
    w = w.double()
    return effective_sample_size_from_sums(w.sum().item(), (w * w).sum().item(), w.numel())


def effective_sample_size_from_sums(w: float, w_sq: float, n: float) -> float:
    return w * w / (n * w_sq) if w_sq > 0 else 0.0


def bucket_name(staleness: int) -> str:
    return f"s{staleness}" if staleness < OLDEST_BUCKET else f"s{OLDEST_BUCKET}+"


BUCKET_SUMS = ("tokens", "weight", "weight_sq", "bounded")  # the columns of ``bucket_sums``


def bucket_sums(weight: torch.Tensor, bounded: torch.Tensor, staleness: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """Per staleness bucket (rows s0 .. s{OLDEST_BUCKET}+), float64 sums over trained tokens of
    ``BUCKET_SUMS``. Sums add across micro-batches and ranks, which is why the figures are made
    from them (``bucket_figures``)."""
    trained = mask > 0
    w = weight[trained].double()
    cols = torch.stack([torch.ones_like(w), w, w * w, bounded[trained].double()], dim=1)
    table = torch.zeros(OLDEST_BUCKET + 1, len(BUCKET_SUMS), dtype=torch.float64, device=w.device)
    return table.index_add_(0, staleness[trained].clamp(max=OLDEST_BUCKET), cols)


def bucket_figures(table: torch.Tensor) -> dict[str, float]:
    """The figures of ``bucket_stats`` from a ``bucket_sums`` table, for buckets that occur."""
    out: dict[str, float] = {}
    for s, (tokens, w, w_sq, bounded) in enumerate(table.tolist()):
        if tokens == 0:
            continue
        name = bucket_name(s)
        out[f"{name}/tokens"] = tokens
        out[f"{name}/is_mean"] = w / tokens
        out[f"{name}/clip_frac"] = bounded / tokens
        out[f"{name}/ess"] = effective_sample_size_from_sums(w, w_sq, tokens)
    return out


def bucket_stats(weight: torch.Tensor, bounded: torch.Tensor, staleness: torch.Tensor,
                 mask: torch.Tensor) -> dict[str, float]:
    """Correction statistics per staleness bucket over trained tokens, for buckets that occur.

    Buckets ``s0`` .. ``s3`` hold one staleness each and ``s4+`` the rest. Per bucket ``b``:
    ``b/tokens``; ``b/is_mean``, the mean weight after bounding; ``b/clip_frac``, the fraction of
    tokens the bound acted on (truncated or masked); ``b/ess``, ``effective_sample_size`` of the
    bounded weights. Sequence-level weights count once per token, like the loss counts them.
    """
    return bucket_figures(bucket_sums(weight, bounded, staleness, mask))
