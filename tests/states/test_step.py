"""``decide(view)``: one scheduler step as a pure function, driven directly (no anyio).

Unit tests for each rule of ``states/step.py``, then a hypothesis property test over random
snapshots: whatever the queue, the leases, the ledger and the bookkeeping, a decision never
grants a lease on a model that is not on the GPU, never grants and fails the same waiter,
never starts a switch that evicts a model with leases, never plans past the room, and the
acquire() fast path (``grants_at_once``) only ever grants what the decision grants.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from states import (
    Decision,
    Evict,
    InsufficientVRAM,
    LeaseDeadlock,
    Ledger,
    Mode,
    PlanRequest,
    Policy,
    Reap,
    Resident,
    StepSettings,
    StepView,
    Switch,
    Tier,
    WaiterView,
    decide,
)
from states.plan import SwitchCosts
from states.step import DEFERRED_POLL_S, backoff_s, grants_at_once
from states.units import gib_to_bytes

NOW = 100.0
BUDGET = gib_to_bytes(15.5)
GB = gib_to_bytes

# The Model Management Module's models: 11.5 GiB LLM, 10.5 GiB SDXL, 3.5 GiB TTS.
REQUESTS = {
    "qwen": PlanRequest("qwen", "llm", GB(11.5), configured_bytes=GB(11.5)),
    "sdxl": PlanRequest(
        "sdxl", "sdxl", GB(10.5), offloadable=True, host_bytes=GB(6.5), configured_bytes=GB(10.5)
    ),
    "tts": PlanRequest("tts", "tts", GB(3.5), configured_bytes=GB(3.5)),
}
KINDS = {"qwen": "llm", "sdxl": "sdxl", "tts": "tts"}


def resident(model: str, *, last_used: int = 1, tier: Tier = Tier.GPU) -> Resident:
    r = REQUESTS[model]
    return Resident(
        model,
        r.kind,
        r.vram_bytes,
        tier=tier,
        exclusive=r.kind in ("llm", "sdxl"),
        offloadable=r.offloadable,
        host_bytes=r.host_bytes,
        last_used=last_used,
    )


def ledger(*models: str, foreign: float = 0.0, host_budget: float = 24.0) -> Ledger:
    return Ledger(
        budget_bytes=BUDGET,
        residents=tuple(resident(m, last_used=i + 1) for i, m in enumerate(models)),
        foreign_bytes=GB(foreign),
        host_budget_bytes=GB(host_budget),
        clock=len(models),
    )


def w(seq: int, model: str, *, ago: float = 0.0, priority: int = 0, holder: Hashable = None) -> WaiterView:
    return WaiterView(seq, model, priority, NOW - ago, f"task-{seq}" if holder is None else holder)


def view(
    waiters: Iterable[WaiterView] = (),
    led: Ledger | None = None,
    *,
    leases: Mapping[str, int] | None = None,
    holders: Mapping[str, Mapping[Hashable, int]] | None = None,
    mode: Mode = Mode.FAIR,
    fairness_s: float = 5.0,
    max_wait_s: float = 300.0,
    fails: bool = False,
    look_period_s: float = 1000.0,  # far off: only the wake time a test is about counts
    requests: Mapping[str, PlanRequest] = REQUESTS,
    **kw: object,
) -> StepView:
    return StepView(
        now_s=NOW,
        ledger=led if led is not None else ledger(),
        waiters=tuple(waiters),
        requests=requests,
        policy=Policy(),
        settings=StepSettings(
            mode=mode,
            fairness_s=fairness_s,
            max_wait_s=max_wait_s,
            foreign_memory_fails=fails,
            look_period_s=look_period_s,
        ),
        leases=leases or {},
        holders=holders or {},
        **kw,  # type: ignore[arg-type]
    )


# -- rule 1: the batch a switch was for ---------------------------------------------------------


def test_after_a_switch_its_whole_batch_is_granted_even_when_another_model_is_due() -> None:
    # The SDXL waiter is overdue: the next target drains the LLM at once; the batch the
    # switch was for is served all the same (otherwise the switch was for nothing).
    v = view([w(1, "qwen", ago=1), w(2, "qwen"), w(3, "sdxl", ago=400)], ledger("qwen"), just_loaded="qwen")
    d = decide(v)
    assert d.grants[:2] == (1, 2)
    assert d.drain == {"qwen"}
    assert d.action is None  # the LLM's new leases hold the switch back


def test_in_fcfs_mode_a_switch_serves_its_waiters_in_arrival_order_only() -> None:
    v = view([w(1, "sdxl"), w(2, "qwen"), w(3, "qwen")], ledger("qwen"), mode=Mode.FCFS, just_loaded="qwen")
    assert decide(v).grants == ()  # waiter 1 (sdxl) came first


def test_after_a_failed_switch_its_waiters_get_its_error() -> None:
    error = RuntimeError("load of 'sdxl' failed")
    v = view([w(1, "sdxl"), w(2, "tts")], ledger(), just_failed=("sdxl", error))
    d = decide(v)
    assert d.failures == ((1, error),)
    assert isinstance(d.action, Switch) and d.action.plan.load == "tts"


# -- rule 2: leftovers --------------------------------------------------------------------------


def test_leftovers_are_reaped_first_and_retried_after_their_time() -> None:
    d = decide(view([w(1, "sdxl")], leftovers=frozenset({"qwen", "tts"}), reap_after={"tts": NOW + 1}))
    assert d.action == Reap(("qwen",))
    assert d.grants == () and d.wake_at_s == NOW
    later = decide(view([], ledger("sdxl"), leftovers=frozenset({"tts"}), reap_after={"tts": NOW + 1}))
    assert later.action is None and later.wake_at_s == NOW + 1


# -- rules 3 and 4: re-entrance and deadlocks ---------------------------------------------------


def test_a_holder_acquiring_its_model_again_is_granted_while_it_drains() -> None:
    v = view(
        [w(1, "sdxl", ago=10), w(2, "qwen", holder="agent")],
        ledger("qwen"),
        leases={"qwen": 1},
        holders={"qwen": {"agent": 1}},
    )
    d = decide(v)
    assert d.grants == (2,)
    assert d.drain == {"qwen"}


def test_waiting_for_a_model_that_needs_ones_own_lease_evicted_is_a_deadlock() -> None:
    v = view(
        [w(1, "sdxl", holder="agent")], ledger("qwen"), leases={"qwen": 1}, holders={"qwen": {"agent": 1}}
    )
    d = decide(v)
    ((seq, err),) = d.failures
    assert seq == 1 and isinstance(err, LeaseDeadlock)
    assert (err.model, err.held) == ("sdxl", "qwen")
    assert d.action is None


def test_a_light_model_beside_ones_own_heavy_lease_is_no_deadlock() -> None:
    v = view(
        [w(1, "tts", holder="agent")], ledger("qwen"), leases={"qwen": 1}, holders={"qwen": {"agent": 1}}
    )
    d = decide(v)
    assert d.failures == ()
    assert isinstance(d.action, Switch) and d.action.plan.load == "tts" and not d.action.plan.evictions


# -- rule 5: rebalancing and requested unloads --------------------------------------------------


def test_over_the_room_idle_residents_go_in_plans_victim_order() -> None:
    # Foreign memory took 4 GiB: 11.5 + 3.5 no longer fit the 11.5 GiB left. The light TTS,
    # first in plan's order, is enough.
    d = decide(view([], ledger("qwen", "tts", foreign=4.0)))
    assert d.action == Evict(("tts",), "over the room")


def test_over_the_room_a_busy_resident_is_not_evicted() -> None:
    d = decide(view([], ledger("qwen", "tts", foreign=4.0), leases={"qwen": 1, "tts": 1}))
    assert d.action is None


def test_a_failed_eviction_backs_rebalancing_and_unloads_off() -> None:
    v = view(
        [], ledger("qwen", foreign=5.0), rebalance_after_s=NOW + 2, to_unload={"qwen": "unload requested"}
    )
    d = decide(v)
    assert d.action is None and d.wake_at_s == NOW + 2


def test_requested_unloads_wait_for_their_leases_and_drain_meanwhile() -> None:
    to_unload = {"qwen": "unload requested", "tts": "reload at its learned size"}
    busy = decide(
        view([w(1, "qwen")], ledger("qwen", "tts"), leases={"qwen": 1, "tts": 1}, to_unload=to_unload)
    )
    assert busy.action is None and busy.grants == () and {"qwen", "tts"} <= busy.drain
    idle = decide(view([], ledger("qwen", "tts"), leases={"tts": 1}, to_unload=to_unload))
    assert idle.action == Evict(("qwen",), "unload requested", requested=True)


def test_an_unload_request_for_a_model_already_gone_is_settled() -> None:
    d = decide(view([], ledger("tts"), to_unload={"qwen": "unload requested"}))
    assert d.settled_unloads == {"qwen"}
    assert d.action is None


# -- rule 6: the target -------------------------------------------------------------------------


def test_a_model_larger_than_the_budget_fails_its_waiters_and_the_next_target_is_served() -> None:
    huge = PlanRequest("huge", "llm", GB(20))
    v = view([w(1, "huge"), w(2, "huge"), w(3, "tts")], requests={**REQUESTS, "huge": huge})
    d = decide(v)
    assert [s for s, _ in d.failures] == [1, 2]
    assert all(isinstance(e, InsufficientVRAM) for _, e in d.failures)
    assert isinstance(d.action, Switch) and d.action.plan.load == "tts"


def test_a_model_blocked_by_foreign_memory_waits_and_looks_again() -> None:
    d = decide(view([w(1, "qwen")], ledger(foreign=6.0)))
    assert d.action is None and d.failures == ()
    assert "qwen" in d.deferred
    assert d.wake_at_s == pytest.approx(NOW + DEFERRED_POLL_S)


def test_under_the_fail_policy_foreign_memory_fails_the_waiters_naming_the_processes() -> None:
    d = decide(view([w(1, "qwen")], ledger(foreign=6.0), fails=True, foreign_text="; other processes: pid 7"))
    ((seq, err),) = d.failures
    assert seq == 1 and isinstance(err, InsufficientVRAM)
    assert "pid 7" in str(err) and "switching.foreign_memory: wait" in str(err)


def test_a_model_backing_off_is_not_switched_to_until_its_time() -> None:
    d = decide(view([w(1, "sdxl")], backoff_until={"sdxl": NOW + 3}))
    assert d.action is None and d.wake_at_s == NOW + 3
    d = decide(view([w(1, "sdxl"), w(2, "tts")], backoff_until={"sdxl": NOW + 3}))
    assert isinstance(d.action, Switch) and d.action.plan.load == "tts"


# -- rules 7 and 8: admission, drains, side loads -----------------------------------------------


def test_a_busy_model_keeps_its_leases_until_the_fairness_bound() -> None:
    v = view([w(1, "sdxl", ago=2), w(2, "qwen")], ledger("qwen"), leases={"qwen": 1})
    d = decide(v)
    assert d.grants == (2,) and d.drain == frozenset()
    assert d.action is None
    assert d.wake_at_s == pytest.approx(NOW + 3)  # when the SDXL waiter has waited 5 s


def test_past_the_fairness_bound_the_busy_model_drains() -> None:
    v = view([w(1, "sdxl", ago=6), w(2, "qwen")], ledger("qwen"), leases={"qwen": 1})
    d = decide(v)
    assert d.grants == () and d.drain == {"qwen"} and d.action is None


def test_an_idle_evictee_is_switched_out_at_once() -> None:
    d = decide(view([w(1, "sdxl")], ledger("qwen", "tts")))
    assert isinstance(d.action, Switch) and not d.action.side_load
    assert [e.model for e in d.action.plan.gpu_evictions] == ["qwen"]
    assert d.action.plan.after.fits()


def test_a_model_that_fits_beside_a_busy_one_loads_meanwhile() -> None:
    v = view([w(1, "sdxl", ago=2), w(2, "tts", ago=1)], ledger("qwen"), leases={"qwen": 1})
    d = decide(v)
    assert isinstance(d.action, Switch) and d.action.side_load
    assert d.action.plan.load == "tts" and not d.action.plan.evictions


def test_a_waiter_becoming_overdue_wakes_the_scheduler() -> None:
    v = view(
        [w(1, "qwen", ago=10), w(2, "sdxl", ago=290)], ledger("qwen"), leases={"qwen": 1}, fairness_s=100
    )
    d = decide(v)
    assert d.wake_at_s == pytest.approx(NOW + 10)  # the SDXL waiter hits max_wait_s 300


def test_with_nothing_to_do_and_nothing_resident_the_scheduler_sleeps_until_poked() -> None:
    assert decide(view()).wake_at_s is None
    # With models resident, the device is read now and then (foreign memory may grow).
    assert decide(view([], ledger("qwen"), look_period_s=1.0)).wake_at_s == pytest.approx(NOW + 1.0)


def test_backoff_doubles_up_to_a_quarter_of_max_wait() -> None:
    assert [backoff_s(n, 1.0, 20.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]


# -- switch-cost-aware fairness -----------------------------------------------------------------

COSTS = {
    "qwen": SwitchCosts(load_s=20.0, restore_s=2.0, unload_s=1.0),
    "sdxl": SwitchCosts(load_s=6.0, restore_s=0.5, unload_s=0.5),
}


def cost_view(
    waiters: Iterable[WaiterView], leases: int, costs: Mapping[str, SwitchCosts] = COSTS
) -> StepView:
    v = view(waiters, ledger("qwen"), leases={"qwen": leases}, costs=costs)
    return replace(v, settings=replace(v.settings, fairness_by_cost=True))


def test_the_cost_rule_never_drains_before_its_floor() -> None:
    # A cheap switch: only the floor (0.6 of max_wait_s = 180 s) holds the drain back.
    cheap = {"qwen": SwitchCosts(unload_s=0.05), "sdxl": SwitchCosts(restore_s=0.1, load_s=0.1)}
    early = decide(cost_view([w(1, "sdxl", ago=100)], leases=2, costs=cheap))
    assert early.drain == frozenset() and early.wake_at_s == pytest.approx(NOW + 80)
    assert decide(cost_view([w(1, "sdxl", ago=181)], leases=2, costs=cheap)).drain == {"qwen"}


def test_past_its_floor_the_cost_rule_waits_for_the_price_of_the_switch() -> None:
    # Switching to SDXL costs the LLM's unload (1 s) and SDXL's cold load (6 s); the LLM has
    # two leases, so the switch holds up three users: a price of 16 x 7 x 3 = 336 waiter-s.
    # 190 are in; the other 146 come from two waiters at once: 73 s from now.
    d = decide(cost_view([w(1, "sdxl", ago=190), w(2, "sdxl")], leases=2))
    assert d.drain == frozenset() and d.wake_at_s == pytest.approx(NOW + 73)
    assert decide(cost_view([w(1, "sdxl", ago=190), w(2, "sdxl", ago=185)], leases=2)).drain == {"qwen"}


def test_under_the_cost_rule_many_waiters_drain_sooner() -> None:
    # 200 waiter-s are in; 136 more are due, from three waiters at once: 136/3 s from now.
    d = decide(cost_view([w(1, "sdxl", ago=200), w(2, "sdxl"), w(3, "sdxl")], leases=2))
    assert d.drain == frozenset() and d.wake_at_s == pytest.approx(NOW + 136 / 3)


def test_under_the_cost_rule_a_busier_evictee_holds_out_longer_but_never_past_max_wait() -> None:
    quiet = decide(cost_view([w(1, "sdxl", ago=200)], leases=1))  # price 16 x 7 x 2 = 224
    assert quiet.drain == frozenset() and quiet.wake_at_s == pytest.approx(NOW + 24)
    busy = decide(cost_view([w(1, "sdxl", ago=200)], leases=4))  # 16 x 7 x 5 = 560 ...
    # ... or the hard bound: half the 7 s switch is done when the waiter has waited max_wait_s
    # (300 s).
    assert busy.drain == frozenset() and busy.wake_at_s == pytest.approx(NOW + 96.5)
    assert decide(cost_view([w(1, "sdxl", ago=296)], leases=4)).drain == frozenset()
    assert decide(cost_view([w(1, "sdxl", ago=296.5)], leases=4)).drain == {"qwen"}


CHEAP = {"qwen": SwitchCosts(load_s=0.1, restore_s=0.1), "sdxl": SwitchCosts(unload_s=0.05)}


def queued_sdxl_view(qwen_ago: float, sdxl_queue_ago: Iterable[float], *, by_cost: bool = True) -> StepView:
    """SDXL resident at its capacity (one image in progress), its queue waiting, an LLM waiter."""
    queue = [w(2 + i, "sdxl", ago=a) for i, a in enumerate(sdxl_queue_ago)]
    v = view(
        [w(1, "qwen", ago=qwen_ago), *queue],
        ledger("sdxl"),
        leases={"sdxl": 1},
        capacity={"sdxl": 1},
        costs=CHEAP,
    )
    return replace(v, settings=replace(v.settings, fairness_by_cost=by_cost))


def test_under_the_cost_rule_a_busy_model_serves_its_older_queue_first() -> None:
    # The LLM waiter is past the floor (180 s) and the price (16 x 0.15 x 3 = 7.2 waiter-s),
    # but an SDXL request queued for the one pipeline arrived before it: SDXL keeps serving.
    older = decide(queued_sdxl_view(200, [250]))
    assert older.drain == frozenset() and older.action is None
    assert older.wake_at_s == pytest.approx(NOW + 50)  # the SDXL request's max_wait_s, not infinity
    # Once the older one is served, or when SDXL's queue is younger, SDXL drains.
    assert decide(queued_sdxl_view(200, [])).drain == {"sdxl"}
    assert decide(queued_sdxl_view(200, [150, 10])).drain == {"sdxl"}
    # One older request among younger ones holds the drain back all the same.
    assert decide(queued_sdxl_view(200, [10, 201])).drain == frozenset()


def test_the_worked_example_of_the_cost_rule() -> None:
    # docs/scheduling.md: the LLM serves two chat requests; artists ask for SDXL. The switch
    # costs the LLM's unload and SDXL's cold load, 6 + 6 s, and holds up three users: a price
    # of 16 x 12 x 3 = 576 waiter-s, past the hard bound, 120 - 12 / 2 = 114 s.
    costs = {"qwen": SwitchCosts(unload_s=6.0), "sdxl": SwitchCosts(load_s=6.0, restore_s=0.13)}

    def due(artists: int, led: Ledger) -> float:
        artists_waiting = [w(i, "sdxl") for i in range(1, artists + 1)]
        v = view(artists_waiting, led, leases={"qwen": 2}, costs=costs, max_wait_s=120)
        d = decide(replace(v, settings=replace(v.settings, fairness_by_cost=True)))
        assert d.drain == frozenset() and d.action is None
        return d.wake_at_s - NOW

    assert due(1, ledger("qwen")) == pytest.approx(114.0)
    assert due(4, ledger("qwen")) == pytest.approx(114.0)  # the price at 144 s: the bound again
    # A pinned host copy of SDXL: 6.13 s, a price of 294 waiter-s, paid by four at 73.5 s.
    host = Ledger(BUDGET, (resident("qwen"), resident("sdxl", tier=Tier.HOST)), host_budget_bytes=GB(24))
    assert due(4, host) == pytest.approx(16 * 6.13 * 3 / 4)


def test_the_worked_example_of_the_cost_rule_the_other_way_round() -> None:
    # docs/scheduling.md: host copies of both; SDXL draws one image, four more are queued, two
    # asked before a chat request that has waited the floor (0.6 x 120 s). The switch costs
    # SDXL's offload and the LLM's restore, 0.55 s: a price of 16 x 0.55 x 6 = 52.8 waiter-s.
    led = Ledger(BUDGET, (resident("sdxl"), resident("qwen", tier=Tier.HOST)), host_budget_bytes=GB(24))
    costs = {"sdxl": SwitchCosts(unload_s=0.05), "qwen": SwitchCosts(restore_s=0.5)}

    def step(queue_ago: list[float]) -> Decision:
        queue = [w(2 + i, "sdxl", ago=a) for i, a in enumerate(queue_ago)]
        v = view(
            [w(1, "qwen", ago=72), *queue],
            led,
            leases={"sdxl": 1},
            capacity={"sdxl": 1},
            costs=costs,
            max_wait_s=120,
        )
        return decide(replace(v, settings=replace(v.settings, fairness_by_cost=True)))

    assert step([80, 75, 30, 10]).drain == frozenset()  # two images asked before it: SDXL goes on
    d = step([30, 10])  # those two have started (one drew, one draws now)
    assert d.drain == {"sdxl"} and d.grants == ()  # the two asked after it wait for the switch back
    assert step([30, 10]).drain == step([]).drain  # younger requests do not hold it back


def test_a_queue_on_a_model_no_lease_has_ended_on_is_counted_in_turns_of_its_load_time() -> None:
    # Four requests for the one SDXL pipeline, 10 s old, behind an LLM with three leases. No
    # SDXL lease has ended, so the turns are counted in its load time (8 s): the fourth begins
    # 24 s after the switch, and the floor (0.6 x 300 s) comes 24 s sooner than without turns.
    def due(**kw: object) -> float:
        v = view(
            [w(i, "sdxl", ago=10) for i in range(1, 5)],
            ledger("qwen"),
            leases={"qwen": 3},
            costs={"sdxl": SwitchCosts(load_s=8.0)},
            **kw,
        )
        d = decide(replace(v, settings=replace(v.settings, fairness_by_cost=True)))
        assert d.drain == frozenset() and d.action is None
        return d.wake_at_s

    floor = NOW - 10 + 0.6 * 300
    assert due() == pytest.approx(floor)  # no limit: every waiter's lease begins at the switch
    assert due(capacity={"sdxl": 1}) == pytest.approx(floor - 24)
    # Once a lease has ended, its learned time counts instead (2 s: the fourth begins at 6 s).
    assert due(capacity={"sdxl": 1}, hold_s={"sdxl": 2.0}) == pytest.approx(floor - 6)


def grace_view(waiters: Iterable[WaiterView], released: tuple[float, Hashable], **kw: object) -> StepView:
    """The LLM resident and idle, its last lease ended ``released`` (seconds ago, by whom)."""
    ago, holder = released
    v = view(waiters, ledger("qwen"), costs=COSTS, last_release={"qwen": (NOW - ago, holder)}, **kw)
    return replace(v, settings=replace(v.settings, fairness_by_cost=True))


def test_a_model_just_released_stays_an_eighth_of_the_switch_for_its_user() -> None:
    from states.scheduling import GRACE_SHARE

    # The switch to SDXL costs 7 s (the LLM's unload, SDXL's load): a grace of 0.875 s after
    # the last lease ended, for its user who is not waiting for anything.
    assert GRACE_SHARE == 0.125
    waiter = [w(1, "sdxl", ago=30)]
    held = decide(grace_view(waiter, (0.5, "chat-agent")))
    assert held.action is None and held.drain == frozenset()
    assert held.wake_at_s == pytest.approx(NOW - 0.5 + 0.875)
    after = decide(grace_view(waiter, (0.9, "chat-agent")))
    assert isinstance(after.action, Switch) and after.action.plan.load == "sdxl"


def test_no_grace_for_a_user_who_now_waits_for_another_model() -> None:
    # The task that released the LLM is the one now waiting for SDXL (a workflow's next
    # step): it is not coming back to the LLM, and the switch goes at once.
    d = decide(grace_view([w(1, "sdxl", holder="workflow")], (0.1, "workflow")))
    assert isinstance(d.action, Switch) and d.action.plan.load == "sdxl"


@pytest.mark.parametrize("mode", [Mode.FCFS, Mode.RESIDENT_FIRST])
def test_the_grace_is_fair_modes_alone(mode: Mode) -> None:
    d = decide(grace_view([w(1, "sdxl", ago=30)], (0.1, "chat-agent"), mode=mode))
    assert isinstance(d.action, Switch) and d.action.plan.load == "sdxl"


def test_no_grace_once_the_waiter_is_due() -> None:
    # An overdue waiter (max_wait_s 300) drains the LLM: the grace does not hold it back.
    d = decide(grace_view([w(1, "sdxl", ago=301)], (0.1, "chat-agent")))
    assert isinstance(d.action, Switch) and d.action.plan.load == "sdxl"


def test_an_overdue_waiter_drains_past_the_evictees_older_queue() -> None:
    d = decide(queued_sdxl_view(300, [310]))
    assert d.drain == {"sdxl"} and d.grants == ()  # max_wait_s is the hard bound


def test_the_time_rule_does_not_look_at_the_evictees_queue() -> None:
    assert decide(queued_sdxl_view(10, [250], by_cost=False)).drain == {"sdxl"}  # fairness_s 5


def test_switch_cost_counts_the_evictions_and_the_tier_the_target_comes_from() -> None:
    from states.step import switch_cost_s

    led = Ledger(BUDGET, (resident("qwen"), resident("sdxl", tier=Tier.HOST)), host_budget_bytes=GB(24))
    d = decide(view([w(1, "sdxl")], led, costs=COSTS))
    assert isinstance(d.action, Switch)
    assert switch_cost_s(view([], led, costs=COSTS), d.action.plan) == pytest.approx(1.0 + 0.5)  # a restore


# -- capacity (max_concurrent) ----------------------------------------------------------------


def test_a_model_at_capacity_keeps_its_other_waiters_waiting_highest_priority_first() -> None:
    v = view(
        [w(1, "sdxl"), w(2, "sdxl", priority=2), w(3, "sdxl", priority=1)],
        ledger("sdxl"),
        leases={"sdxl": 1},
        capacity={"sdxl": 2},
    )
    d = decide(v)
    assert d.grants == (2,)  # one free slot: the highest priority
    assert decide(view([w(1, "sdxl")], ledger("sdxl"), leases={"sdxl": 2}, capacity={"sdxl": 2})).grants == ()


def test_at_capacity_an_overdue_waiter_goes_before_any_priority() -> None:
    v = view(
        [w(1, "sdxl", priority=2), w(2, "sdxl", ago=301)],
        ledger("sdxl"),
        leases={"sdxl": 1},
        capacity={"sdxl": 2},
    )
    assert decide(v).grants == (2,)


def test_the_batch_of_a_switch_is_cut_at_capacity_in_arrival_order() -> None:
    v = view(
        [w(1, "sdxl"), w(2, "sdxl"), w(3, "sdxl")], ledger("sdxl"), just_loaded="sdxl", capacity={"sdxl": 1}
    )
    assert decide(v).grants == (1,)


def test_a_holder_acquiring_again_is_granted_past_capacity() -> None:
    v = view(
        [w(1, "sdxl"), w(2, "sdxl", holder="artist")],
        ledger("sdxl"),
        leases={"sdxl": 1},
        holders={"sdxl": {"artist": 1}},
        capacity={"sdxl": 1},
    )
    assert decide(v).grants == (2,)


def test_a_drain_waits_only_for_the_leases_in_progress() -> None:
    # SDXL draws one image at a time; three more wait for it. The LLM's waiter is past the
    # fairness bound: SDXL drains; the switch waits for the one image, not for the queue.
    v = view(
        [w(1, "qwen", ago=10), w(2, "sdxl"), w(3, "sdxl"), w(4, "sdxl")],
        ledger("sdxl"),
        leases={"sdxl": 1},
        capacity={"sdxl": 1},
    )
    d = decide(v)
    assert d.grants == () and d.drain == {"sdxl"} and d.action is None
    idle = decide(view([w(1, "qwen", ago=10), w(2, "sdxl")], ledger("sdxl"), capacity={"sdxl": 1}))
    assert isinstance(idle.action, Switch) and idle.action.plan.load == "qwen"


def test_the_fast_path_respects_capacity() -> None:
    led = ledger("sdxl")
    kw = {"queue_length": 1, "switching": False, "draining": frozenset(), "to_unload": {}}
    assert grants_at_once(led, "sdxl", held=0, capacity=1, **kw)  # type: ignore[arg-type]
    assert not grants_at_once(led, "sdxl", held=1, capacity=1, **kw)  # type: ignore[arg-type]
    assert grants_at_once(led, "sdxl", held=5, capacity=None, **kw)  # type: ignore[arg-type]


# -- the property test --------------------------------------------------------------------------

MODELS = sorted(REQUESTS)
HOLDERS = ["a", "b", "c"]


@st.composite
def views(draw: st.DrawFn) -> StepView:
    on_gpu = draw(st.sets(st.sampled_from(MODELS)))
    heavy = [m for m in on_gpu if KINDS[m] in ("llm", "sdxl")]
    if len(heavy) > 1:  # exclusive kinds never co-reside
        on_gpu -= set(heavy[1:])
    residents = [resident(m, last_used=i + 1) for i, m in enumerate(sorted(on_gpu))]
    if "sdxl" not in on_gpu and draw(st.booleans()):
        residents.append(resident("sdxl", tier=Tier.HOST))
    foreign = draw(st.sampled_from([0.0, 0.0, 1.0, 4.0, 6.0, 16.0]))
    led = Ledger(BUDGET, tuple(residents), foreign_bytes=GB(foreign), host_budget_bytes=GB(24), clock=10)
    leases = {m: draw(st.integers(0, 2)) for m in on_gpu}
    holders: dict[str, dict[Hashable, int]] = {}
    for m, n in leases.items():
        for _ in range(n):
            h = draw(st.sampled_from(HOLDERS))
            holders.setdefault(m, {})[h] = holders.get(m, {}).get(h, 0) + 1
    n_waiters = draw(st.integers(0, 6))
    waiters = tuple(
        WaiterView(
            seq,
            draw(st.sampled_from(MODELS)),
            draw(st.integers(0, 2)),
            NOW - draw(st.floats(0, 400)),
            draw(st.sampled_from([*HOLDERS, f"fresh-{seq}"])),
        )
        for seq in range(1, n_waiters + 1)
    )
    gpu_names = sorted(on_gpu)
    return StepView(
        now_s=NOW,
        ledger=led,
        waiters=waiters,
        requests=REQUESTS,
        settings=StepSettings(
            mode=draw(st.sampled_from(list(Mode))),
            fairness_by_cost=draw(st.booleans()),
            fairness_s=draw(st.sampled_from([0.0, 5.0, 60.0])),
            max_wait_s=draw(st.sampled_from([30.0, 300.0])),
            foreign_memory_fails=draw(st.booleans()),
        ),
        leases=leases,
        holders=holders,
        lost_gpu_s={m: NOW - draw(st.floats(0, 100)) for m in draw(st.sets(st.sampled_from(MODELS)))},
        backoff_until={m: NOW + draw(st.floats(-5, 5)) for m in draw(st.sets(st.sampled_from(MODELS)))},
        to_unload={m: "unload requested" for m in draw(st.sets(st.sampled_from(gpu_names)))}
        if gpu_names
        else {},
        leftovers=frozenset(draw(st.sets(st.sampled_from([m for m in MODELS if m not in on_gpu])))),
        reap_after={m: NOW + draw(st.floats(-1, 1)) for m in draw(st.sets(st.sampled_from(MODELS)))},
        rebalance_after_s=NOW + draw(st.sampled_from([-1.0, 1.0])),
        just_loaded=draw(st.none() | st.sampled_from(gpu_names)) if gpu_names else None,
        capacity={m: draw(st.integers(1, 3)) for m in draw(st.sets(st.sampled_from(MODELS)))},
        costs={
            m: SwitchCosts(draw(st.floats(0, 30)), draw(st.floats(0, 3)), draw(st.floats(0, 3)))
            for m in draw(st.sets(st.sampled_from(MODELS)))
        },
    )


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(views())
def test_decide_properties(v: StepView) -> None:
    d = decide(v)
    by_seq = {w.seq: w for w in v.waiters}
    granted = list(d.grants)
    failed = [s for s, _ in d.failures]
    # Every decision names real waiters, each at most once, never both granted and failed.
    assert len(granted) == len(set(granted)) and len(failed) == len(set(failed))
    assert set(granted) <= set(by_seq) and set(failed) <= set(by_seq)
    assert not set(granted) & set(failed)
    on_gpu = {r.model for r in v.ledger.gpu_residents}
    for s in granted:
        wv = by_seq[s]
        # Leases only on resident models; a model marked for unloading or draining takes no
        # new holder (re-entrance and the batch of the switch that loaded it excepted).
        assert wv.model in on_gpu
        reentrant = bool(v.holders.get(wv.model, {}).get(wv.holder))
        if not reentrant and wv.model != v.just_loaded:
            assert wv.model not in v.to_unload
            # (fcfs serves those who came before the head even on a model about to leave)
            assert wv.model not in d.drain or v.settings.mode is Mode.FCFS
    assert set(v.to_unload) - d.settled_unloads <= d.drain or d.action is not None
    leases_after = dict(v.leases)
    for s in granted:
        leases_after[by_seq[s].model] = leases_after.get(by_seq[s].model, 0) + 1
    # No grant takes a model past its capacity, but a holder's own second lease.
    for m, cap in v.capacity.items():
        bounded = [
            s for s in granted if by_seq[s].model == m and not v.holders.get(m, {}).get(by_seq[s].holder)
        ]
        assert len(bounded) <= max(0, cap - v.leases.get(m, 0))
    if isinstance(d.action, Switch):
        p = d.action.plan
        assert p.load not in on_gpu and p.after.fits()
        for e in p.gpu_evictions:  # a switch never evicts a model with leases
            assert not leases_after.get(e.model)
        if d.action.side_load:
            assert not p.gpu_evictions
        waited = {by_seq[s].model for s in by_seq if s not in granted and s not in failed}
        assert p.load in waited  # a switch is for someone who still waits
    elif isinstance(d.action, Evict):
        assert not d.grants or all(
            by_seq[s].model == v.just_loaded or v.holders.get(by_seq[s].model, {}).get(by_seq[s].holder)
            for s in d.grants
        )
        for m in d.action.models:
            assert m in on_gpu and not leases_after.get(m)
    elif isinstance(d.action, Reap):
        assert set(d.action.models) <= v.leftovers
    if d.wake_at_s is not None:
        assert d.wake_at_s >= v.now_s
    # acquire()'s fast path grants only what the decision grants a lone waiter (at once, or
    # right after an eviction the decision takes first).
    for m in MODELS:
        if not grants_at_once(
            v.ledger,
            m,
            queue_length=1,
            switching=False,
            draining=frozenset(),
            to_unload=v.to_unload,
            held=v.leases.get(m, 0),
            capacity=v.capacity.get(m),
        ):
            continue
        alone = StepView(
            now_s=NOW,
            ledger=v.ledger,
            waiters=(WaiterView(999, m, 0, NOW, "lone"),),
            requests=REQUESTS,
            settings=v.settings,
            leases=v.leases,
            holders=v.holders,
            to_unload=v.to_unload,
            capacity=v.capacity,
        )
        fast = decide(alone)
        assert 999 in fast.grants or isinstance(fast.action, Evict), (m, fast)
