"""Advantage estimators: one small function each."""

from __future__ import annotations

import math


def grpo_advantages(rewards: list[float], trainable: list[bool], *, normalize_std: bool = True,
                    eps: float = 1e-6) -> list[float]:
    """GRPO: each sample's reward minus its group's mean, over the std when ``normalize_std``.

    Samples that are not trainable (failed) neither contribute to the baseline nor get an
    advantage. A group whose trainable rewards are all equal gets zeros: it carries no signal.
    """
    vals = [r for r, ok in zip(rewards, trainable) if ok]
    if not vals:
        return [0.0] * len(rewards)
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((r - mean) ** 2 for r in vals) / max(1, len(vals) - 1)) if len(vals) > 1 else 0.0
    scale = 1.0 / (std + eps) if normalize_std else 1.0
    return [(r - mean) * scale if ok else 0.0 for r, ok in zip(rewards, trainable)]
