"""The several-card benchmark's runs, small: every request served within each card's budget,
and two cards with placement finish before one card does."""

from __future__ import annotations

import pytest

pytest.importorskip("trio")

from benchmarks.multigpu import critical_path_s, run_one, serial_work_s, trace_for


def test_two_cards_serve_the_trace_within_each_budget_and_faster_than_one() -> None:
    trace = trace_for(1, quick=True)
    one = run_one(trace, "one card", "fast", 1)
    two = run_one(trace, "two cards", "fast", 1)
    for r in (one, two):
        assert not r.errors and not r.over_budget, (r.errors[:2], r.over_budget[:2])
        assert len(r.waits_s) == trace.requests  # every request served
    assert set(two.switches) <= {0, 1} and one.switches.keys() <= {0}
    assert two.makespan_s < one.makespan_s
    # the bound the benchmark prints is one no run beats: a model drawing one image at a time
    # on one card does its work in series, and an agent's steps follow one another
    model, work_s = serial_work_s(trace)
    assert model == "sdxl-base"
    assert two.makespan_s >= max(work_s, critical_path_s(trace)) > 0
