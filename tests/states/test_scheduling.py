"""Scheduling decisions: which model to switch in next and which waiters to grant, in the three
modes (fair, fcfs, resident_first)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import pytest

from states import Admission, Mode, SchedulerView, WaiterView, admission, choose_target

ALL_MODES = list(Mode)
NOW = 1000.0


def w(seq: int, model: str, *, priority: int = 0, ago: float = 0.0) -> WaiterView:
    """A waiter that arrived ``ago`` seconds before NOW."""
    return WaiterView(seq=seq, model=model, priority=priority, arrived_s=NOW - ago)


def view(
    waiters: Iterable[WaiterView],
    on_gpu: Iterable[str] = (),
    *,
    mode: Mode = Mode.FAIR,
    lost_ago: Mapping[str, float] | None = None,
    blocked: Iterable[str] = (),
    fairness_s: float = 5.0,
    max_wait_s: float = 300.0,
) -> SchedulerView:
    return SchedulerView(
        now_s=NOW,
        waiters=tuple(waiters),
        on_gpu=frozenset(on_gpu),
        lost_gpu_s={m: NOW - a for m, a in (lost_ago or {}).items()},
        blocked=frozenset(blocked),
        mode=mode,
        fairness_s=fairness_s,
        max_wait_s=max_wait_s,
    )


def adm(grant: Iterable[int], drain: Iterable[str] = ()) -> Admission:
    return Admission(frozenset(grant), frozenset(drain))


# -- choose_target: common to all modes --------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.value)
def test_no_waiters_no_target(mode: Mode) -> None:
    assert choose_target(view([], ["qwen-14b"], mode=mode)) is None


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.value)
def test_only_resident_waiters_no_target(mode: Mode) -> None:
    v = view([w(1, "qwen-14b", ago=500), w(2, "gpt-sovits")], ["qwen-14b", "gpt-sovits"], mode=mode)
    assert choose_target(v) is None


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.value)
def test_blocked_models_are_never_chosen(mode: Mode) -> None:
    waiters = [
        w(1, "sdxl-base", priority=9, ago=400),  # first, highest priority, overdue: but blocked
        w(2, "gpt-sovits", ago=1),
    ]
    assert choose_target(view(waiters, ["qwen-14b"], mode=mode, blocked=["sdxl-base"])) == "gpt-sovits"
    assert choose_target(view(waiters[:1], ["qwen-14b"], mode=mode, blocked=["sdxl-base"])) is None


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.value)
def test_blocked_resident_waiters_are_still_granted_without_a_target(mode: Mode) -> None:
    v = view([w(1, "sdxl-base"), w(2, "qwen-14b")], ["qwen-14b"], mode=mode, blocked=["sdxl-base"])
    assert choose_target(v) is None
    assert admission(v, None, frozenset()) == adm([2])


# -- choose_target: fair -----------------------------------------------------------------------


def test_fair_oldest_waiter_wins() -> None:
    v = view([w(1, "sdxl-base", ago=3), w(2, "gpt-sovits", ago=10)], ["qwen-14b"])
    assert choose_target(v) == "gpt-sovits"


def test_fair_age_counts_from_losing_the_gpu_not_from_arrival() -> None:
    waiters = [w(1, "qwen-14b", ago=10), w(2, "sdxl-base", ago=5)]
    assert choose_target(view(waiters, ["gpt-sovits"])) == "qwen-14b"  # by arrival: qwen
    # qwen-14b lost the GPU 2 s ago: its waiter's age is 2 s, sdxl-base's is 5 s.
    assert choose_target(view(waiters, ["gpt-sovits"], lost_ago={"qwen-14b": 2})) == "sdxl-base"


def test_fair_losing_the_gpu_before_arrival_does_not_age_a_waiter() -> None:
    waiters = [w(1, "qwen-14b", ago=3), w(2, "sdxl-base", ago=5)]
    v = view(waiters, ["gpt-sovits"], lost_ago={"qwen-14b": 60})
    assert v.since_s(waiters[0]) == NOW - 3
    assert choose_target(v) == "sdxl-base"


def test_fair_priority_beats_age() -> None:
    v = view([w(1, "sdxl-base", ago=200), w(2, "qwen-14b", priority=1, ago=1)], [])
    assert choose_target(v) == "qwen-14b"


def test_fair_overdue_beats_priority() -> None:
    waiters = [w(1, "sdxl-base", ago=300), w(2, "qwen-14b", priority=10, ago=1)]
    assert choose_target(view(waiters, [])) == "sdxl-base"  # exactly max_wait_s: overdue
    waiters = [w(1, "sdxl-base", ago=299.5), w(2, "qwen-14b", priority=10, ago=1)]
    assert choose_target(view(waiters, [])) == "qwen-14b"  # not yet overdue


def test_fair_overdue_counts_from_arrival_even_after_losing_the_gpu() -> None:
    waiters = [w(1, "sdxl-base", ago=301), w(2, "qwen-14b", priority=10, ago=1)]
    v = view(waiters, [], lost_ago={"sdxl-base": 1})
    assert v.overdue(waiters[0])
    assert choose_target(v) == "sdxl-base"


def test_fair_overdue_respects_max_wait() -> None:
    waiters = [w(1, "sdxl-base", ago=20), w(2, "qwen-14b", priority=10, ago=1)]
    assert choose_target(view(waiters, [], max_wait_s=15)) == "sdxl-base"
    assert choose_target(view(waiters, [], max_wait_s=25)) == "qwen-14b"


def test_fair_a_model_is_ranked_by_its_best_waiter() -> None:
    waiters = [
        w(1, "sdxl-base", ago=50),
        w(2, "qwen-14b", ago=1),
        w(3, "qwen-14b", priority=2, ago=0),
    ]
    assert choose_target(view(waiters, [])) == "qwen-14b"


@pytest.mark.parametrize(("first", "second"), [("zeta", "alpha"), ("alpha", "zeta")])
def test_fair_ties_go_to_the_earliest_arrival(first: str, second: str) -> None:
    waiters = [w(1, first, ago=4), w(2, second, ago=4), w(3, second, ago=4)]
    assert choose_target(view(waiters, [])) == first


def test_fair_tie_after_both_lost_the_gpu_together() -> None:
    # Both were evicted by the same plan: their waiters' ages count from the same instant.
    waiters = [w(1, "gpt-sovits", ago=30), w(2, "sdxl-base", ago=20)]
    v = view(waiters, ["qwen-14b"], lost_ago={"gpt-sovits": 10, "sdxl-base": 10})
    assert choose_target(v) == "gpt-sovits"


def test_fair_ties_go_to_the_earliest_arrival_whatever_the_tuple_order() -> None:
    # zeta's first waiter (seq 1) arrived before alpha's (seq 2), but is listed after seq 3.
    waiters = [w(3, "zeta", ago=4), w(2, "alpha", ago=4), w(1, "zeta", ago=4)]
    assert choose_target(view(waiters, [])) == "zeta"


# -- choose_target: fcfs and resident_first ----------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.FCFS, Mode.RESIDENT_FIRST], ids=lambda m: m.value)
def test_non_fair_modes_take_the_earliest_non_resident_waiter(mode: Mode) -> None:
    waiters = [
        w(1, "qwen-14b", ago=9),  # resident: not a target
        w(2, "gpt-sovits", ago=8),
        w(3, "sdxl-base", priority=10, ago=400),  # higher priority and overdue: ignored here
    ]
    assert choose_target(view(waiters, ["qwen-14b"], mode=mode)) == "gpt-sovits"


@pytest.mark.parametrize("mode", [Mode.FCFS, Mode.RESIDENT_FIRST], ids=lambda m: m.value)
def test_non_fair_modes_order_by_seq_not_tuple_order(mode: Mode) -> None:
    waiters = [w(5, "sdxl-base"), w(4, "gpt-sovits")]
    assert choose_target(view(waiters, [], mode=mode)) == "gpt-sovits"


# -- admission without a target ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.value)
def test_no_target_grants_every_resident_waiter(mode: Mode) -> None:
    v = view([w(1, "qwen-14b"), w(2, "gpt-sovits"), w(3, "qwen-14b")], ["qwen-14b", "gpt-sovits"], mode=mode)
    assert admission(v, None, frozenset()) == adm([1, 2, 3])


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.value)
def test_nothing_to_grant(mode: Mode) -> None:
    assert admission(view([], ["qwen-14b"], mode=mode), None, frozenset()) == adm([])


# -- admission: fair ---------------------------------------------------------------------------

RESIDENT = ["qwen-14b", "gpt-sovits"]
EVICT_QWEN = frozenset({"qwen-14b"})


def fair_queue(target_ago: float, *, target_priority: int = 0, qwen_priority: int = 0) -> list[WaiterView]:
    return [
        w(1, "qwen-14b", priority=qwen_priority, ago=30),
        w(2, "sdxl-base", priority=target_priority, ago=target_ago),
        w(3, "gpt-sovits", ago=0),
        w(4, "qwen-14b", ago=0),
    ]


def test_fair_grants_resident_waiters_before_the_fairness_bound() -> None:
    v = view(fair_queue(4.9), RESIDENT)
    assert choose_target(v) == "sdxl-base"
    assert admission(v, "sdxl-base", EVICT_QWEN) == adm([1, 3, 4])


def test_fair_drains_evictees_after_the_fairness_bound() -> None:
    for ago in (5.0, 60.0):
        v = view(fair_queue(ago), RESIDENT)
        # qwen-14b takes no new leases; gpt-sovits (not evicted) keeps serving.
        assert admission(v, "sdxl-base", EVICT_QWEN) == adm([3], ["qwen-14b"])


def test_fair_bound_is_configurable() -> None:
    v = view(fair_queue(4.0), RESIDENT, fairness_s=3.0)
    assert admission(v, "sdxl-base", EVICT_QWEN) == adm([3], ["qwen-14b"])


def test_fair_age_for_admission_counts_from_losing_the_gpu() -> None:
    # sdxl-base's waiter arrived a minute ago, but sdxl-base lost the GPU only 2 s ago.
    v = view(fair_queue(60), RESIDENT, lost_ago={"sdxl-base": 2})
    assert admission(v, "sdxl-base", EVICT_QWEN) == adm([1, 3, 4])


def test_fair_oldest_target_waiter_counts() -> None:
    waiters = [*fair_queue(1.0), w(5, "sdxl-base", ago=6.0)]
    v = view(waiters, RESIDENT)
    assert admission(v, "sdxl-base", EVICT_QWEN) == adm([3], ["qwen-14b"])


def test_fair_overdue_target_drains_at_once() -> None:
    # Arrived 300 s ago (overdue) though sdxl-base lost the GPU just now: drains regardless.
    v = view(fair_queue(300), RESIDENT, lost_ago={"sdxl-base": 0.5})
    assert admission(v, "sdxl-base", EVICT_QWEN) == adm([3], ["qwen-14b"])


def test_fair_higher_priority_target_drains_at_once() -> None:
    v = view(fair_queue(0.0, target_priority=1), RESIDENT)
    assert admission(v, "sdxl-base", EVICT_QWEN) == adm([3], ["qwen-14b"])


@pytest.mark.parametrize("qwen_priority", [1, 2])
def test_fair_equal_or_lower_priority_target_waits_for_the_bound(qwen_priority: int) -> None:
    v = view(fair_queue(0.0, target_priority=1, qwen_priority=qwen_priority), RESIDENT)
    assert admission(v, "sdxl-base", EVICT_QWEN) == adm([1, 3, 4])


def test_fair_outranking_compares_only_with_the_evictees_waiters() -> None:
    waiters = [*fair_queue(0.0, target_priority=1), w(5, "gpt-sovits", priority=9)]
    v = view(waiters, RESIDENT)
    assert admission(v, "sdxl-base", EVICT_QWEN) == adm([3, 5], ["qwen-14b"])


def test_fair_nothing_to_evict_grants_everyone() -> None:
    v = view(fair_queue(60), RESIDENT)
    assert admission(v, "sdxl-base", frozenset()) == adm([1, 3, 4])


def test_fair_drains_every_evictee() -> None:
    v = view(fair_queue(60), RESIDENT)
    both = frozenset(RESIDENT)
    assert admission(v, "sdxl-base", both) == adm([], RESIDENT)


# -- admission: fcfs ---------------------------------------------------------------------------


def test_fcfs_grants_only_resident_waiters_ahead_of_the_target() -> None:
    waiters = [
        w(1, "gpt-sovits"),
        w(2, "sdxl-base"),  # the head non-resident waiter
        w(3, "gpt-sovits"),
        w(4, "sdxl-base"),
    ]
    v = view(waiters, ["gpt-sovits"], mode=Mode.FCFS)
    assert choose_target(v) == "sdxl-base"
    assert admission(v, "sdxl-base", frozenset()) == adm([1])


def test_fcfs_drains_evictees_at_once() -> None:
    waiters = [w(1, "gpt-sovits"), w(2, "sdxl-base", ago=0), w(3, "qwen-14b")]
    v = view(waiters, RESIDENT, mode=Mode.FCFS)
    assert admission(v, "sdxl-base", EVICT_QWEN) == adm([1], ["qwen-14b"])


def test_fcfs_ignores_fairness_and_priority() -> None:
    waiters = [w(1, "gpt-sovits"), w(2, "sdxl-base", priority=-5, ago=0), w(3, "gpt-sovits", priority=9)]
    v = view(waiters, RESIDENT, mode=Mode.FCFS, fairness_s=1000)
    assert admission(v, "sdxl-base", frozenset()) == adm([1])


def test_fcfs_serves_an_earlier_waiter_of_a_model_about_to_be_evicted() -> None:
    waiters = [w(1, "qwen-14b"), w(2, "sdxl-base")]
    v = view(waiters, ["qwen-14b"], mode=Mode.FCFS)
    assert choose_target(v) == "sdxl-base"
    assert 1 in admission(v, "sdxl-base", EVICT_QWEN).grant


# -- admission: resident_first -----------------------------------------------------------------


@pytest.mark.parametrize(
    "waiters",
    [
        fair_queue(0.0),
        fair_queue(60.0),  # past the fairness bound
        fair_queue(400.0),  # overdue
        fair_queue(0.0, target_priority=9),  # outranks
    ],
    ids=["fresh", "past-bound", "overdue", "outranks"],
)
def test_resident_first_never_drains(waiters: list[WaiterView]) -> None:
    v = view(waiters, RESIDENT, mode=Mode.RESIDENT_FIRST)
    assert admission(v, "sdxl-base", EVICT_QWEN) == adm([1, 3, 4])


# -- views -------------------------------------------------------------------------------------


def test_view_defaults() -> None:
    v = SchedulerView(now_s=0.0, waiters=(), on_gpu=frozenset())
    assert v.mode is Mode.FAIR
    assert v.fairness_s == 5.0
    assert v.max_wait_s == 300.0
    assert v.blocked == frozenset()
    assert dict(v.leases) == {} and dict(v.lost_gpu_s) == {}


# -- drain_due_at: the cost rule ------------------------------------------------------------


def test_cost_rule_waits_for_the_evictees_older_waiters() -> None:
    from states.scheduling import FLOOR_SHARE, drain_due_at

    # qwen-14b is resident with two more requests queued past its capacity; sdxl-base waits.
    target = [w(1, "sdxl-base", ago=100)]
    evict = frozenset({"qwen-14b"})
    younger = view([*target, w(2, "qwen-14b", ago=50), w(3, "qwen-14b", ago=5)], ["qwen-14b"])
    due = drain_due_at(younger, "sdxl-base", evict, switch_cost_s=0.1)
    assert due == pytest.approx(NOW - 100 + FLOOR_SHARE * 300)  # the floor: younger queues do not count
    older = view([*target, w(2, "qwen-14b", ago=101)], ["qwen-14b"])
    assert drain_due_at(older, "sdxl-base", evict, switch_cost_s=0.1) == math.inf
    # Without an older queue, the hard bound: half the switch (10 s) is done by max_wait_s (300 s).
    busy = view([w(1, "sdxl-base", ago=250), w(2, "qwen-14b", ago=5)], ["qwen-14b"])  # price 320 waiter-s
    assert drain_due_at(busy, "sdxl-base", evict, switch_cost_s=10.0) == pytest.approx(NOW - 250 + 300 - 5)
    # The time rule, and waiters of models that are not evicted, are left alone.
    assert drain_due_at(older, "sdxl-base", evict) == pytest.approx(NOW - 100 + 5.0)
    other = view([*target, w(2, "gpt-sovits", ago=500)], ["qwen-14b", "gpt-sovits"])
    assert drain_due_at(other, "sdxl-base", evict, switch_cost_s=0.1) < math.inf


def test_a_queue_on_a_model_that_serves_few_at_once_reaches_its_floor_sooner() -> None:
    import dataclasses

    from states.scheduling import FLOOR_SHARE, drain_due_at

    # Four waiters for sdxl-base (one image at a time, 8 s a lease) behind a busy qwen-14b.
    target = [w(i, "sdxl-base", ago=10) for i in range(1, 5)]
    evict = frozenset({"qwen-14b"})
    base = view([*target], ["qwen-14b"])
    learned = dataclasses.replace(base, capacity={"sdxl-base": 1}, hold_s={"sdxl-base": 8.0})
    assert learned.queued_s("sdxl-base", 4) == [0.0, 8.0, 16.0, 24.0]
    assert dataclasses.replace(learned, capacity={"sdxl-base": 2}).queued_s("sdxl-base", 4) == [0, 0, 8, 8]
    # No limit, or no lease ended yet: nobody waits for a turn.
    assert base.queued_s("sdxl-base", 2) == [0.0, 0.0]
    assert dataclasses.replace(learned, hold_s={}).queued_s("sdxl-base", 2) == [0.0, 0.0]
    floor = NOW - 10 + FLOOR_SHARE * 300
    assert drain_due_at(base, "sdxl-base", evict, switch_cost_s=0.1) == pytest.approx(floor)
    # The fourth waiter's lease begins 24 s after the switch: the floor comes 24 s sooner.
    assert drain_due_at(learned, "sdxl-base", evict, switch_cost_s=0.1) == pytest.approx(floor - 24)
    # Turns of 100 s: the last waiter would begin 300 s after the switch, past the floor
    # already; the price (16 x 0.1 s for the one user held up) is paid, so the drain is due now.
    slow = dataclasses.replace(learned, hold_s={"sdxl-base": 100.0})
    assert drain_due_at(slow, "sdxl-base", evict, switch_cost_s=0.1) == pytest.approx(NOW)
    # The price still holds a drain back: a dear switch (100 s) is paid for later.
    assert drain_due_at(slow, "sdxl-base", evict, switch_cost_s=100.0) > NOW
