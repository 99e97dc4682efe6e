"""The several-card benchmark's runs, small: every request served within each card's budget,
and two cards with placement finish before one card does."""

from __future__ import annotations

import pytest

pytest.importorskip("trio")

from benchmarks.multigpu import run_one, trace_for


def test_two_cards_serve_the_trace_within_each_budget_and_faster_than_one() -> None:
    trace = trace_for(1, quick=True)
    one = run_one(trace, "one card", "fast", 1)
    two = run_one(trace, "two cards", "fast", 1)
    for r in (one, two):
        assert not r.errors and not r.over_budget, (r.errors[:2], r.over_budget[:2])
        assert len(r.waits_s) == trace.requests  # every request served
    assert set(two.switches) <= {0, 1} and one.switches.keys() <= {0}
    assert two.makespan_s < one.makespan_s
