"""Importance weights of the decoupled objective against plain-Python float64 references."""

import math

import pytest
import torch

from policies.correction import bucket_stats, effective_sample_size, importance_weight, upper_bound
from runtime import cli
from runtime.config import to_toml_dict

LOW, HIGH, CAPS = 0.85, 1.3, [2.0, 1.5, 1.2]


def reference(prox, behavior, mask, stale, *, level, mode, low, high, caps):
    """Row by row with math.exp / math.fsum: the bounded weight and where the bound acted."""
    weights, acted = [], []
    for p_row, b_row, m_row, s_row in zip(prox, behavior, mask, stale):
        n = len(p_row)
        trained = [j for j in range(n) if m_row[j]]
        logs = [p_row[j] - b_row[j] for j in range(n)]

        def cap(s):
            return caps[min(s, len(caps) - 1)] if caps else high

        if level == "token":
            per = [logs[j] if m_row[j] else 0.0 for j in range(n)]
            his = [cap(s_row[j] if m_row[j] else 0) for j in range(n)]
        else:
            total = math.fsum(logs[j] for j in trained)
            if level == "geometric":
                total /= max(1, len(trained))
            per = [total] * n
            his = [cap(max((s_row[j] for j in trained), default=0))] * n
        w_row, a_row = [], []
        for x, hi in zip(per, his):
            raw = math.exp(x)
            out = raw < low or raw > hi
            w_row.append(min(max(raw, low), hi) if mode == "truncate" else (0.0 if out else raw))
            a_row.append(out)
        weights.append(w_row)
        acted.append(a_row)
    return weights, acted


@pytest.mark.parametrize("caps", [[], CAPS], ids=["flat", "by_staleness"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_importance_weight_matches_float64_reference(level, mode, caps):
    g = torch.Generator().manual_seed(7)
    b, t = 10, 7
    drift = torch.linspace(0.02, 1.0, b, dtype=torch.float64)[:, None]  # from near on-policy to far off
    prox = torch.randn(b, t, generator=g, dtype=torch.float64) * 0.5 - 2.0
    behavior = prox + torch.randn(b, t, generator=g, dtype=torch.float64) * drift
    mask = (torch.rand(b, t, generator=g) < 0.8).double()
    mask[0] = 0.0  # a sequence with nothing trained: its sum is empty
    stale = torch.randint(0, 5, (b, t), generator=g)
    w, acted = importance_weight(prox, behavior, mask, stale, level=level, mode=mode, low=LOW, high=HIGH, caps=caps)
    ref_w, ref_acted = reference(prox.tolist(), behavior.tolist(), mask.tolist(), stale.tolist(),
                                 level=level, mode=mode, low=LOW, high=HIGH, caps=caps)
    assert w.dtype == torch.float64 and not w.requires_grad
    assert torch.allclose(w, torch.tensor(ref_w, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert acted.tolist() == ref_acted
    trained = mask.bool()
    assert acted[trained].any() and not acted[trained].all()  # some tokens inside the bounds, some outside


def test_staleness_rule_indexes_caps_and_sequences_take_their_stalest_token():
    stale = torch.tensor([[0, 1, 2, 5], [0, 0, 1, 9]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])  # the 9 is not trained
    assert upper_bound(stale, mask, "token", caps=CAPS, default=9.0)[0].tolist() == [2.0, 1.5, 1.2, 1.2]
    assert upper_bound(stale, mask, "sequence", caps=CAPS, default=9.0).tolist() == [[1.2] * 4, [1.5] * 4]
    assert upper_bound(stale, mask, "geometric", caps=[], default=3.0).tolist() == [[3.0] * 4] * 2


def test_an_overflowing_sequence_product_is_still_bounded():
    prox, behavior = torch.zeros(1, 3), torch.full((1, 3), -40.0)  # exp(120) overflows float32
    mask, stale = torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.long)
    kw = dict(level="sequence", low=0.0, high=2.0)
    assert importance_weight(prox, behavior, mask, stale, mode="truncate", **kw)[0].tolist() == [[2.0] * 3]
    assert importance_weight(prox, behavior, mask, stale, mode="mask", **kw)[0].tolist() == [[0.0] * 3]


def test_effective_sample_size_is_normalised():
    assert effective_sample_size(torch.ones(4)) == 1.0
    assert effective_sample_size(torch.tensor([3.0, 0.0, 0.0, 0.0])) == 0.25
    assert effective_sample_size(torch.zeros(3)) == 0.0
    assert effective_sample_size(torch.tensor([1.0, 2.0])) == pytest.approx(9 / 10, abs=1e-15)


def test_bucket_stats_on_a_hand_made_batch():
    weight = torch.tensor([[1.0, 2.0, 0.5, 9.9], [1.0, 1.0, 0.0, 3.0]])
    acted = torch.tensor([[False, True, False, True], [False, False, True, False]])
    stale = torch.tensor([[0, 0, 1, 7], [1, 5, 1, 0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # the staleness-7 token is not trained
    stats = bucket_stats(weight, acted, stale, mask)
    # s0: weights 1, 2, 3; s1: 0.5, 1, 0 (masked out by MIS); s4+: the staleness-5 token alone
    expect = {
        "s0/tokens": 3.0, "s0/is_mean": 2.0, "s0/clip_frac": 1 / 3, "s0/ess": 36 / (3 * 14),
        "s1/tokens": 3.0, "s1/is_mean": 0.5, "s1/clip_frac": 1 / 3, "s1/ess": 2.25 / (3 * 1.25),
        "s4+/tokens": 1.0, "s4+/is_mean": 1.0, "s4+/clip_frac": 0.0, "s4+/ess": 1.0,
    }
    assert stats.keys() == expect.keys()
    for k, v in expect.items():
        assert stats[k] == pytest.approx(v, abs=1e-12), k


def test_config_flags_parse_validate_and_round_trip(tmp_path, capsys):
    cfg = cli.resolve(["--tis-clip-by-staleness", "2,1.5,1.2", "--tis-level", "geometric", "--tis-mode", "mask"])
    g = cfg.grpo
    assert (g.tis_clip_by_staleness, g.tis_level, g.tis_mode) == ([2.0, 1.5, 1.2], "geometric", "mask")
    assert cli.resolve(["--tis-clip-by-staleness", ""]).grpo.tis_clip_by_staleness == []
    path = tmp_path / "config.toml"
    path.write_text(cli.dumps_toml(to_toml_dict(cfg)))
    assert cli.resolve(["--config", str(path)]) == cfg
    for argv in (["--tis-clip-by-staleness", "1.2,1.5"], ["--tis-clip-by-staleness", "2,0"],
                 ["--tis-clip-low", "0.5", "--tis-clip-by-staleness", "2,0.5"],
                 ["--tis-clip-by-staleness", "2,x"]):
        with pytest.raises(SystemExit):
            cli.resolve(argv)
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--tis-clip-by-staleness" in err, err
