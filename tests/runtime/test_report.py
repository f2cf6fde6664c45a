"""``python -m runtime.report``: figures and report.md from a real run, and the numbers behind them."""

from __future__ import annotations

import argparse

import pytest

from runtime.report import main, overlap_s, parse_window
from tests.runtime.short_run import short_run

PNGS = ["reward.png", "staleness.png", "waits.png", "queues.png", "syncs.png", "gantt.png"]


def test_report_of_a_real_run_writes_every_figure_and_the_markdown(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[report]')")
    assert main([str(short_run()), "--out", str(tmp_path)]) == 0
    for png in PNGS:
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    md = (tmp_path / "report.md").read_text()
    assert all(f"![{png}]({png})" in md for png in PNGS)
    assert "| status | completed |" in md and "steps/s" in md and "while groups were generating" in md
    assert "exact per-bucket counts" in md or "estimated" in md


def test_an_explicit_window_is_used_and_a_bad_one_refused(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed")
    assert main([str(short_run()), "--out", str(tmp_path), "--window", "0:2.5"]) == 0
    assert "over 0.0-2.5s" in (tmp_path / "report.md").read_text()
    for bad in ("3:1", "a:b", "5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_window(bad)


def test_not_a_run_directory_is_exit_2(tmp_path):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path)])
    assert e.value.code == 2


def test_token_staleness_exact_from_buckets_else_estimated_from_means():
    pytest.importorskip("matplotlib", reason="matplotlib is not installed")
    from runtime.figures import token_staleness

    exact = [{"staleness/mean": 0.5, "train/n_tokens": 10, "correction/s0/tokens": 5.0,
              "correction/s1/tokens": 5.0},
             {"staleness/mean": 3.0, "train/n_tokens": 4, "correction/s4+/tokens": 4.0}]
    assert token_staleness(exact) == ({"0": 5.0, "1": 5.0, "4+": 4.0}, True)
    estimated = [{"staleness/mean": 0.25, "train/n_tokens": 100}, {"staleness/mean": 2.0, "train/n_tokens": 10}]
    assert token_staleness(estimated) == ({"0": 75.0, "1": 25.0, "2": 10.0}, False)


def test_overlap_counts_only_time_when_both_ran():
    def ev(name, start_s, dur_s, tid):
        return {"ph": "X", "name": name, "tid": tid, "ts": start_s * 1e6, "dur": dur_s * 1e6}

    meta = [{"ph": "M", "name": "thread_name", "tid": t, "args": {"track": k, "lane": 0}}
            for t, k in ((1, "learner"), (2, "groups"), (3, "groups"))]
    events = meta + [ev("train", 1, 2, 1), ev("train", 5, 1, 1),  # 3 s of training
                     ev("generate", 0, 1.5, 2), ev("generate", 1.2, 0.3, 3), ev("generate", 2.5, 3, 2)]
    # train [1,3] meets generate [0,1.5] and [2.5,5.5]: 1.0 s; train [5,6] meets [2.5,5.5]: 0.5 s
    assert overlap_s(events, (0, 10), "train", "generate") == pytest.approx((3.0, 1.5))
    assert overlap_s(events, (2, 5.2), "train", "generate") == pytest.approx((1.2, 0.7))
