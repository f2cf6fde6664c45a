"""``python -m runtime.tune``: the grid, the recommendation rule, and a tiny grid end to end."""

from __future__ import annotations

import json

import pytest

from runtime.run_stats import RunStats
from runtime.tune import Point, Result, grid, main, recommend


def result(s: int, steps_per_s: float, staleness: float, status: str = "completed") -> Result:
    stats = RunStats(steps=60, time_s=60 / steps_per_s, steps_per_s=steps_per_s, tokens_per_s=steps_per_s * 600,
                     staleness_mean=staleness, staleness_max=s, final_reward=0.3, final_eval=0.3,
                     learner_wait=0.1, generator_wait=0.1)
    return Result(Point(s, None), status, wall_s=80.0, stats=stats if status == "completed" else None)


def test_recommends_the_least_stale_within_the_margin_of_the_fastest():
    table = [result(0, 2.0, 0.0), result(1, 3.5, 0.6), result(2, 3.9, 1.2), result(4, 4.0, 2.5)]
    pick, why = recommend(table, margin=0.1)  # floor 3.6: s2 and s4 qualify; s2 is fresher
    assert pick.point.max_staleness == 2
    assert "s4-cauto" in why and "2 of 4" in why and "1.20" in why
    assert recommend(table, margin=0.15)[0].point.max_staleness == 1  # floor 3.4 admits s1
    assert recommend(table, margin=0.0)[0].point.max_staleness == 4  # only the fastest


def test_ties_in_staleness_go_to_the_faster_and_failed_runs_never_win():
    table = [result(1, 3.0, 0.5), result(2, 3.1, 0.5), result(0, 9.9, 0.0, status="failed")]
    assert recommend(table, margin=0.1)[0].point.max_staleness == 2
    with pytest.raises(ValueError, match="no run completed"):
        recommend([result(0, 1.0, 0.0, status="failed")], margin=0.1)


def test_grid_skips_points_whose_effective_capacity_repeats():
    points = grid([0, 1, 2], ["auto", "2x", "40"], groups_per_step=16, over_sampling=[None])
    # s0: every capacity is 16; s1: auto = 32 = 2x, 40 > 32; s2: auto 48, 2x 32, 40
    assert [p.name for p in points] == ["s0-cauto", "s1-cauto", "s2-cauto", "s2-c32", "s2-c40"]
    assert [p.name for p in grid([1], ["auto"], groups_per_step=16, over_sampling=[None, 32])] == [
        "s1-cauto", "s1-cauto-o32"]
    assert Point(1, None, 32).flags() == ["--max-staleness", "1", "--over-sampling-batch-size", "32"]
    with pytest.raises(ValueError, match="cannot hold"):
        grid([1], ["8"], groups_per_step=16, over_sampling=[None])


def test_a_tiny_grid_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "tune"
    rc = main(["--quick", "--staleness", "0,1", "--num-rollout", "3", "--out", str(out), "--",
               "--eval-num-prompts", "20", "--no-trace"])
    assert rc == 0, (out / "s0-cauto.log").read_text()[-2000:]
    data = json.loads((out / "tune.json").read_text())
    assert [r["status"] for r in data["results"]] == ["completed", "completed"]
    assert all(r["stats"]["steps"] == 3 for r in data["results"])
    assert not (out / "s0-cauto" / "trace.json").exists()  # the user's flags reached every run
    md = (out / "tune.md").read_text()
    assert "| s0-cauto |" in md and "| s1-cauto |" in md and "**Recommendation: `--max-staleness" in md
    assert "recommended: --max-staleness" in capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "tune.png").read_bytes()[:4] == b"\x89PNG"
