import math

import torch

from policies.advantages import grpo_advantages
from policies.loss import kl_penalty, masked_mean, ppo_clip


def test_grpo_advantages_match_float64_reference_and_skip_failed():
    r = [1.0, 0.0, 0.5, 0.25]
    ok = [True, True, True, False]
    adv = grpo_advantages(r, ok)
    vals = r[:3]
    mean = sum(vals) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in vals) / 2)
    assert adv[3] == 0.0
    for a, x in zip(adv[:3], vals):
        assert abs(a - (x - mean) / (std + 1e-6)) < 1e-12
    assert grpo_advantages([0.3] * 4, [True] * 4) == [0.0] * 4
    assert grpo_advantages([1.0, 0.0], [True, True], normalize_std=False) == [0.5, -0.5]


def test_ppo_clip_matches_reference_per_token():
    torch.manual_seed(0)
    logp = torch.randn(3, 5, dtype=torch.float64) * 0.3
    old = torch.randn(3, 5, dtype=torch.float64) * 0.3
    adv = torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    loss, clipped = ppo_clip(logp, old, adv, eps_low=0.2, eps_high=0.28)
    for i in range(3):
        for j in range(5):
            ratio = math.exp(logp[i, j].item() - old[i, j].item())
            a = adv[i, 0].item()
            expect = -min(ratio * a, min(max(ratio, 0.8), 1.28) * a)
            assert abs(loss[i, j].item() - expect) < 1e-12
            assert clipped[i, j].item() == float(min(max(ratio, 0.8), 1.28) * a < ratio * a)


def test_kl_estimators_and_masked_mean():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    d = logp - ref
    assert torch.allclose(kl_penalty(logp, ref, "k1"), d)
    assert torch.allclose(kl_penalty(logp, ref, "k2"), 0.5 * d**2)
    assert torch.allclose(kl_penalty(logp, ref, "low_var_kl"), torch.exp(-d) - 1 + d)
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 0.0])).item() == 2.0
