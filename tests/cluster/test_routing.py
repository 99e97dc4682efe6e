"""Routing across machines (``states.routing``): pure, on the Model Management Module's
figures (each machine a 16 GiB card with a 15.5 GiB budget; qwen-14b 11.5 GiB, sdxl-base
10.5 GiB with a 6.5 GiB host copy, gpt-sovits 3.5 GiB)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from states import Ledger, PlanRequest, Policy, Resident, Tier, gib_to_bytes
from states.cards import Card, Cards
from states.plan import SwitchCosts
from states.routing import (
    Choice,
    MachineView,
    NoRoute,
    RouteRequest,
    names_of,
    rank,
    route,
)

BUDGET = gib_to_bytes(15.5)
MODELS = {
    "qwen-14b": ("llm", 11.5, False, 0.0),
    "sdxl-base": ("sdxl", 10.5, True, 6.5),
    "gpt-sovits": ("tts", 3.5, False, 0.0),
    "big-llm": ("llm", 15.0, False, 0.0),
}
REQUESTS = {
    name: PlanRequest(name, kind, gib_to_bytes(gb), offloadable=off, host_bytes=gib_to_bytes(host))
    for name, (kind, gb, off, host) in MODELS.items()
}
NAMES = names_of(
    {name: (kind, ("sdxl-alias",) if name == "sdxl-base" else ()) for name, (kind, *_) in MODELS.items()},
    {"llm": "qwen-14b", "sdxl": "sdxl-base", "tts": "gpt-sovits"},
)
COSTS = {
    "qwen-14b": SwitchCosts(load_s=20.0, restore_s=20.0, unload_s=2.0),
    "sdxl-base": SwitchCosts(load_s=15.0, restore_s=1.0, unload_s=1.0),
    "gpt-sovits": SwitchCosts(load_s=5.0, restore_s=5.0, unload_s=0.5),
    "big-llm": SwitchCosts(load_s=30.0, restore_s=30.0, unload_s=2.0),
}


def resident(model: str, tier: Tier = Tier.GPU, last_used: int = 1) -> Resident:
    kind, gb, off, host = MODELS[model]
    return Resident(
        model,
        kind,
        gib_to_bytes(gb),
        tier=tier,
        exclusive=kind in ("llm", "sdxl"),
        offloadable=off,
        host_bytes=gib_to_bytes(host),
        last_used=last_used,
    )


def machine(node: str, *residents: Resident, budget: int = BUDGET, **kw: Any) -> MachineView:
    ledger = Ledger(budget_bytes=budget, residents=residents, host_budget_bytes=gib_to_bytes(24), clock=5)
    kw.setdefault("costs", COSTS)
    kw.setdefault("requests", REQUESTS)
    return MachineView(node, Cards.single(ledger), names=NAMES, policy=Policy(), **kw)


def test_resident_machine_first() -> None:
    views = [machine("a"), machine("b", resident("qwen-14b")), machine("c", resident("sdxl-base"))]
    r = route(RouteRequest("llm"), views)
    assert (r.node, r.model, r.choice) == ("b", "qwen-14b", Choice.RESIDENT)
    assert route(RouteRequest("sdxl-alias"), views).node == "c"


def test_resident_ties_go_to_the_least_loaded() -> None:
    views = [
        machine("a", resident("qwen-14b"), leases={"qwen-14b": 3}),
        machine("b", resident("qwen-14b"), leases={"qwen-14b": 1}, waiting={"sdxl-base": 1}),
        machine("c", resident("qwen-14b"), leases={"qwen-14b": 1}),
    ]
    assert route(RouteRequest("qwen-14b"), views).node == "c"


def test_host_copy_before_room() -> None:
    # b holds sdxl's host copy (a 1 s restore, but it must evict the idle LLM); c is empty (a 15 s load)
    views = [
        machine("b", resident("qwen-14b"), resident("sdxl-base", Tier.HOST)),
        machine("c"),
    ]
    r = route(RouteRequest("sdxl"), views)
    assert (r.node, r.choice) == ("b", Choice.HOST)
    assert r.evictions == 1 and r.evicted_bytes == gib_to_bytes(11.5)
    assert r.cost_s == pytest.approx(2.0 + 1.0)  # the LLM's unload, then the restore
    assert rank(RouteRequest("sdxl"), views)[1].node == "c"


def test_cheapest_room_then_least_loaded() -> None:
    # a must evict the idle LLM for SDXL; b has room beside its busy TTS; c has TTS coming
    # (waited for) and room beside it; d is empty and idle
    views = [
        machine("a", resident("qwen-14b")),
        machine("b", resident("gpt-sovits"), leases={"gpt-sovits": 1}),
        machine("c", waiting={"gpt-sovits": 2}),
        machine("d"),
    ]
    order = rank(RouteRequest("sdxl"), views)
    assert [r.node for r in order] == ["d", "b", "c", "a"]
    assert [r.evictions for r in order] == [0, 0, 0, 1]
    assert {r.choice for r in order} == {Choice.ROOM}


def test_a_move_never_evicts_a_busy_model_when_another_machine_has_room() -> None:
    views = [machine("a", resident("qwen-14b"), leases={"qwen-14b": 1}), machine("b", resident("qwen-14b"))]
    r = route(RouteRequest("sdxl"), views)
    assert (r.node, r.choice) == ("b", Choice.ROOM)
    drained = rank(RouteRequest("sdxl"), views)[1]
    assert (drained.node, drained.choice, drained.busy_evictions) == ("a", Choice.AFTER_DRAIN, 1)


def test_busy_everywhere_waits_for_the_fewest_busy_evictions() -> None:
    views = [
        machine("a", resident("qwen-14b"), resident("gpt-sovits"), leases={"qwen-14b": 1, "gpt-sovits": 1}),
        machine("b", resident("qwen-14b"), resident("gpt-sovits"), leases={"qwen-14b": 1}),
    ]
    r = route(RouteRequest("big-llm"), views)  # 15 GiB: both residents must go on either machine
    assert (r.node, r.choice, r.busy_evictions) == ("b", Choice.AFTER_DRAIN, 1)


def test_a_model_waited_for_counts_as_coming() -> None:
    # the router sent an LLM request to a a moment ago: its snapshot does not show it yet
    views = [machine("a", waiting={"qwen-14b": 1}), machine("b")]
    assert route(RouteRequest("llm"), views).node == "a"
    # and SDXL does not go where the LLM is coming: it would have to evict it
    assert route(RouteRequest("sdxl"), views).node == "b"


def test_a_load_in_progress_counts_as_resident() -> None:
    loading = Ledger(budget_bytes=BUDGET).begin_load(resident("qwen-14b"))
    a = MachineView("a", Cards.single(loading), REQUESTS, NAMES, costs=COSTS)
    assert route(RouteRequest("llm"), [machine("b"), a]).node == "a"
    assert route(RouteRequest("sdxl"), [machine("b"), a]).node == "b"  # not beside the LLM coming


def test_a_full_resident_machine_spills_when_the_wait_is_unknown_or_long() -> None:
    full = machine(
        "a",
        resident("sdxl-base"),
        leases={"sdxl-base": 1},
        waiting={"sdxl-base": 1},
        capacity={"sdxl-base": 1},
    )
    views = [full, machine("b", resident("qwen-14b"))]
    r = route(RouteRequest("sdxl"), views)
    assert (r.node, r.choice) == ("b", Choice.ROOM)  # hold time unknown: the move wins
    long = route(
        RouteRequest("sdxl", hold_s={"sdxl-base": 60.0}), views
    )  # 2 ahead x 60 s > 17 s of switching
    assert long.node == "b"
    short = route(RouteRequest("sdxl", hold_s={"sdxl-base": 2.0}), views)  # 2 ahead x 2 s < 17 s: queue
    assert (short.node, short.choice, short.cost_s) == ("a", Choice.QUEUED, 4.0)


def test_a_free_slot_on_a_limited_model_is_resident() -> None:
    views = [
        machine("a", resident("qwen-14b"), leases={"qwen-14b": 7}, capacity={"qwen-14b": 8}),
        machine("b"),
    ]
    assert route(RouteRequest("llm"), views).choice is Choice.RESIDENT
    views[0] = machine("a", resident("qwen-14b"), leases={"qwen-14b": 8}, capacity={"qwen-14b": 8})
    assert route(RouteRequest("llm"), views).node == "b"


def test_a_full_machine_with_nowhere_to_spill_queues() -> None:
    views = [
        machine("a", resident("sdxl-base"), leases={"sdxl-base": 1}, capacity={"sdxl-base": 1}),
        machine("b", resident("qwen-14b"), leases={"qwen-14b": 2}),
    ]
    order = rank(RouteRequest("sdxl"), views)
    assert [(r.node, r.choice) for r in order] == [("a", Choice.QUEUED), ("b", Choice.AFTER_DRAIN)]
    assert math.isinf(order[0].cost_s)


def test_the_holders_own_lease_decides() -> None:
    # this holder holds the LLM on b: a second lease on it is granted there at once, full or not
    views = [
        machine("a", resident("qwen-14b")),
        machine("b", resident("qwen-14b"), leases={"qwen-14b": 8}, capacity={"qwen-14b": 8}),
    ]
    held = {"b": frozenset({"qwen-14b"})}
    r = route(RouteRequest("llm", held=held), views)
    assert (r.node, r.choice) == ("b", Choice.HELD)


def test_no_route_that_deadlocks_the_holder_while_another_machine_can() -> None:
    # the holder holds the LLM on a; SDXL there would evict it: b serves it instead, even busy
    views = [
        machine("a", resident("qwen-14b"), leases={"qwen-14b": 1}),
        machine("b", resident("qwen-14b"), leases={"qwen-14b": 3}),
    ]
    held = {"a": frozenset({"qwen-14b"})}
    order = rank(RouteRequest("sdxl", held=held), views)
    assert [(r.node, r.choice) for r in order] == [("b", Choice.AFTER_DRAIN), ("a", Choice.DEADLOCK)]


def test_down_unknown_and_too_small_machines_are_never_chosen() -> None:
    views = [
        machine("a", resident("qwen-14b"), alive=False),
        machine("b", requests={k: v for k, v in REQUESTS.items() if k != "qwen-14b"}),
        machine("c", budget=gib_to_bytes(8)),
        machine("d"),
    ]
    assert [r.node for r in rank(RouteRequest("llm"), views)] == ["d"]
    with pytest.raises(NoRoute) as info:
        route(RouteRequest("llm"), views[:3])
    text = str(info.value)
    assert "a: down" in text and "b: its config has no such model" in text and "c: needs 11.50 GiB" in text
    with pytest.raises(NoRoute, match="the cluster has no machines"):
        route(RouteRequest("llm"), [])


def test_a_raw_reservation_goes_to_the_cheapest_room() -> None:
    views = [machine("a", resident("qwen-14b")), machine("b", resident("gpt-sovits"))]
    r = route(RouteRequest("", external_bytes=gib_to_bytes(8)), views)
    assert (r.node, r.model, r.choice, r.evictions) == ("b", "", Choice.ROOM, 0)


def test_foreign_memory_defers_last() -> None:
    crowded = Ledger(budget_bytes=BUDGET, foreign_bytes=gib_to_bytes(10))
    views = [
        MachineView("a", Cards.single(crowded), REQUESTS, NAMES, costs=COSTS),
        machine("b", resident("qwen-14b"), leases={"qwen-14b": 1}),
    ]
    assert [(r.node, r.choice) for r in rank(RouteRequest("sdxl"), views)] == [
        ("b", Choice.AFTER_DRAIN),
        ("a", Choice.DEFERRED),
    ]


def test_names_resolve_as_a_config_does() -> None:
    names = names_of({"m1": ("llm", ("llm", "x")), "m2": ("sdxl", ("m1",))}, {"llm": "m2"})
    assert names["m1"] == "m1"  # a name before an alias
    assert names["llm"] == "m2"  # a kind's default before an alias
    assert names["x"] == "m1"


def test_describe_names_the_move() -> None:
    r = route(RouteRequest("sdxl"), [machine("b", resident("qwen-14b"))])
    assert r.describe() == "sdxl-base on b (the cheapest room, 17 s, evicting 1 (11.50 GiB); load 0)"


def test_placement_chooses_the_card_on_a_machine_of_several() -> None:
    # a has two cards: the LLM busy on cuda:0, cuda:1 empty; b has one card with an idle LLM
    two = Cards(
        (Card(0), Card(1)),
        (Ledger(budget_bytes=BUDGET, residents=(resident("qwen-14b"),)), Ledger(budget_bytes=BUDGET)),
    )
    a = MachineView("a", two, REQUESTS, NAMES, costs=COSTS, leases={"qwen-14b": 1})
    views = [a, machine("b", resident("qwen-14b"))]
    r = route(RouteRequest("sdxl"), views)
    assert (r.node, r.gpus, r.choice, r.evictions) == ("a", (1,), Choice.ROOM, 0)  # no eviction at all
    # a model the config keeps on cuda:0 (models.<name>.gpus) must wait for the drain there
    only0 = MachineView(
        "a", two, REQUESTS, NAMES, costs=COSTS, leases={"qwen-14b": 1}, allowed={"sdxl-base": (0,)}
    )
    r = route(RouteRequest("sdxl"), [only0, machine("b", resident("qwen-14b"))])
    assert (r.node, r.choice) == ("b", Choice.ROOM)


def test_a_drain_competes_with_a_queue_by_its_expected_cost() -> None:
    # SDXL is full on a (one slot, 3 queued); b runs a busy LLM whose leases last 2 s
    views = [
        machine(
            "a",
            resident("sdxl-base"),
            leases={"sdxl-base": 1},
            waiting={"sdxl-base": 3},
            capacity={"sdxl-base": 1},
        ),
        machine("b", resident("qwen-14b"), leases={"qwen-14b": 2}),
    ]
    holds = {"sdxl-base": 8.0, "qwen-14b": 2.0}
    r = route(RouteRequest("sdxl", hold_s=holds), views)
    # the queue: 4 ahead x 8 s = 32 s; the drain: 2 s for the LLM's leases + 2 s unload + 15 s
    # load, and the LLM resident nowhere else must be reloaded for its users (20 s): 39 s
    assert (r.node, r.choice, r.cost_s) == ("a", Choice.QUEUED, 32.0)
    assert rank(RouteRequest("sdxl", hold_s=holds), views)[1].cost_s == 39.0
    # with the LLM resident on another machine too, draining b costs 19 s: the drain wins
    views.append(machine("c", resident("qwen-14b"), leases={"qwen-14b": 3}))  # (busier than b)
    r = route(RouteRequest("sdxl", hold_s=holds), views)
    assert (r.node, r.choice, r.cost_s) == ("b", Choice.AFTER_DRAIN, 19.0)
    # with the LLM's hold time unknown, its drain could take any time: the queue
    r = route(RouteRequest("sdxl", hold_s={"sdxl-base": 8.0}), views)
    assert (r.node, r.choice) == ("a", Choice.QUEUED)


def test_route_is_ranks_first() -> None:
    views = [
        machine("a", resident("qwen-14b"), leases={"qwen-14b": 8}, capacity={"qwen-14b": 8}),
        machine("b", resident("qwen-14b"), leases={"qwen-14b": 2}, capacity={"qwen-14b": 8}),
        machine("c"),
        machine("d", resident("sdxl-base", Tier.HOST)),
    ]
    for name in ("llm", "sdxl", "tts", "big-llm"):
        assert route(RouteRequest(name), views) == rank(RouteRequest(name), views)[0]
