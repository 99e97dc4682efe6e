"""Several cards in states/: the per-card ledgers, placement, and decide's multi-card rule."""

from __future__ import annotations

import pytest

from states.cards import Card, Cards
from states.errors import InsufficientVRAM
from states.ledger import Resident, Tier
from states.placement import PlaceContext, place
from states.plan import Plan, PlanRequest, Policy, SwitchCosts
from states.scheduling import WaiterView
from states.step import StepView, Switch, decide
from states.units import GIB


def two_cards(host_gib: int = 0) -> Cards:
    return Cards.of([(Card(0, "a"), 23 * GIB), (Card(1, "b"), 15 * GIB)], host_gib * GIB)


def res(model: str, kind: str, gib: float, **kw: object) -> Resident:
    return Resident(model=model, kind=kind, vram_bytes=int(gib * GIB), exclusive=kind != "tts", **kw)  # type: ignore[arg-type]


def req(model: str, kind: str, gib: float, **kw: object) -> PlanRequest:
    return PlanRequest(model=model, kind=kind, vram_bytes=int(gib * GIB), **kw)  # type: ignore[arg-type]


def loaded(cards: Cards, gpu: int, r: Resident) -> Cards:
    return cards.begin_load(gpu, r).finish_load(gpu)


# -- Cards -------------------------------------------------------------------------------------


def test_a_card_listed_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        Cards.of([(Card(0), GIB), (Card(0), GIB)])


def test_each_card_keeps_its_own_budget_and_residents() -> None:
    cards = loaded(loaded(two_cards(), 0, res("llm", "llm", 14)), 1, res("sdxl", "sdxl", 10))
    assert cards.gpus_of("llm") == (0,) and cards.gpus_of("sdxl") == (1,)
    assert cards.ledger(0).committed_bytes == 14 * GIB and cards.ledger(1).committed_bytes == 10 * GIB
    assert cards.committed_bytes == 24 * GIB and cards.budget_bytes == 38 * GIB
    summary = cards.summary()
    assert {r.model for r in summary.gpu_residents} == {"llm", "sdxl"}
    assert summary.budget_bytes == 38 * GIB


def test_a_host_copy_is_shared_and_restores_onto_another_card() -> None:
    cards = loaded(two_cards(host_gib=16), 0, res("sdxl", "sdxl", 10, offloadable=True, host_bytes=6 * GIB))
    cards = cards.move("sdxl", Tier.HOST)
    assert cards.host_gpu("sdxl") == 0
    # card 1 plans with every host copy of the machine
    assert cards.view(1).tier_of("sdxl") is Tier.HOST
    cards = cards.begin_load(1, res("sdxl", "sdxl", 10))
    assert cards.host_gpu("sdxl") is None and cards.ledger(0).get("sdxl") is None
    assert cards.loading_on(1) is not None and cards.loading_on(1).model == "sdxl"  # type: ignore[union-attr]


def test_a_model_on_one_card_cannot_load_on_another() -> None:
    cards = loaded(two_cards(), 0, res("llm", "llm", 14))
    with pytest.raises(ValueError, match="already on cuda:0"):
        cards.begin_load(1, res("llm", "llm", 14))


def test_a_spanning_model_leaves_all_its_cards_together() -> None:
    share = res("tp", "llm", 12.5)
    cards = two_cards().begin_load(0, share).begin_load(1, share).finish_load(0).finish_load(1)
    assert cards.gpus_of("tp") == (0, 1)
    cards = cards.move("tp", Tier.DISK)
    assert cards.gpus_of("tp") == () and cards.committed_bytes == 0


# -- placement ---------------------------------------------------------------------------------


def test_placement_prefers_the_resident_card_then_the_free_one() -> None:
    cards = loaded(two_cards(), 0, res("llm", "llm", 14))
    ctx = PlaceContext(leases={"llm": 1})
    assert place(req("llm", "llm", 14), cards, ctx).gpus == (0,)
    # sdxl would evict the busy llm on card 0; card 1 is free
    p = place(req("sdxl", "sdxl", 10), cards, ctx)
    assert p.gpus == (1,) and p.why == "room"


def test_placement_prefers_the_card_with_the_cheapest_evictions() -> None:
    cards = loaded(loaded(two_cards(), 0, res("llm", "llm", 14)), 1, res("tts", "tts", 14))
    ctx = PlaceContext(costs={"llm": SwitchCosts(20.0, 0.5, 6.0), "tts": SwitchCosts(3.0, 0.05, 1.0)})
    assert place(req("sdxl", "sdxl", 10), cards, ctx).gpus == (1,)  # evicting the tts costs less


def test_placement_honours_the_cards_a_model_may_use() -> None:
    ctx = PlaceContext(allowed={"sdxl": (1,)})
    cards = two_cards()
    assert place(req("sdxl", "sdxl", 10), cards, ctx).gpus == (1,)
    with pytest.raises(InsufficientVRAM, match="fits no card"):
        place(req("big", "llm", 20), cards, PlaceContext(allowed={"big": (1,)}))


def test_a_host_copy_that_cannot_move_restores_on_its_own_card() -> None:
    cards = loaded(two_cards(host_gib=16), 1, res("vllm", "llm", 10, offloadable=True, host_bytes=1))
    cards = cards.move("vllm", Tier.HOST)
    assert place(req("vllm", "llm", 10), cards, PlaceContext()).gpus == (1,)
    assert place(req("vllm", "llm", 10), cards, PlaceContext(portable=frozenset({"vllm"}))).gpus == (0,)


def test_a_spanning_model_takes_the_best_k_cards() -> None:
    cards = Cards.of([(Card(0), 16 * GIB), (Card(1), 16 * GIB), (Card(2), 16 * GIB)])
    cards = loaded(cards, 1, res("llm", "llm", 10))
    p = place(req("tp", "llm", 12), cards, PlaceContext(spans={"tp": 2}, leases={"llm": 1}))
    assert p.gpus == (0, 2)
    with pytest.raises(InsufficientVRAM, match="spans 3 cards"):
        place(req("tp", "llm", 20), cards, PlaceContext(spans={"tp": 3}))


# -- decide on several cards -------------------------------------------------------------------


def view(cards: Cards, waiters: list[tuple[int, str]], requests: list[PlanRequest], **kw: object) -> StepView:
    return StepView(
        now_s=10.0,
        ledger=cards.ledgers[0],
        waiters=tuple(WaiterView(seq, model, 0, 0.0) for seq, model in waiters),
        requests={r.model: r for r in requests},
        cards=cards,
        **kw,  # type: ignore[arg-type]
    )


def test_two_heavy_models_switch_in_on_two_cards_at_once() -> None:
    d = decide(view(two_cards(), [(1, "llm"), (2, "sdxl")], [req("llm", "llm", 14), req("sdxl", "sdxl", 10)]))
    targets = {gpu: a.plan.load for gpu, a in d.actions if isinstance(a, Switch)}
    assert targets == {0: "llm", 1: "sdxl"}


def test_a_busy_card_decides_nothing_and_its_target_is_not_placed_again() -> None:
    v = view(
        two_cards(),
        [(1, "llm"), (2, "sdxl")],
        [req("llm", "llm", 14), req("sdxl", "sdxl", 10)],
        busy=frozenset({0}),
        loading={"llm": (0,)},
    )
    d = decide(v)
    assert [(g, a.plan.load) for g, a in d.actions if isinstance(a, Switch)] == [(1, "sdxl")]


def test_grants_on_each_card_resident() -> None:
    cards = loaded(loaded(two_cards(), 0, res("llm", "llm", 14)), 1, res("sdxl", "sdxl", 10))
    d = decide(view(cards, [(1, "llm"), (2, "sdxl")], [req("llm", "llm", 14), req("sdxl", "sdxl", 10)]))
    assert sorted(d.grants) == [1, 2] and not d.actions


def test_a_model_too_large_for_every_card_fails_its_waiters() -> None:
    d = decide(view(two_cards(), [(1, "big")], [req("big", "llm", 30)]))
    assert d.failures and isinstance(d.failures[0][1], InsufficientVRAM)


def test_a_spanning_model_switches_on_all_its_cards_jointly() -> None:
    share = req("tp", "llm", 12.5)
    d = decide(view(two_cards(), [(1, "tp")], [share], spans={"tp": 2}))
    assert len(d.actions) == 1
    gpu, action = d.actions[0]
    assert isinstance(action, Switch) and gpu == 0
    assert [g for g, _ in action.more] == [1] and isinstance(action.more[0][1], Plan)


def test_a_spanning_model_waits_while_one_of_its_cards_is_busy_with_a_lease() -> None:
    cards = loaded(two_cards(), 1, res("sdxl", "sdxl", 10))
    share = req("tp", "llm", 12.5)
    requests = [share, req("sdxl", "sdxl", 10)]
    d = decide(view(cards, [(1, "tp")], requests, spans={"tp": 2}, leases={"sdxl": 1}))
    assert not d.actions  # the joint switch waits for sdxl's lease; sdxl drains
    assert "sdxl" in d.drain


def test_one_card_decides_as_before() -> None:
    cards = Cards.single(two_cards().ledgers[0])
    v = view(cards, [(1, "llm")], [req("llm", "llm", 14)])
    d = decide(v)
    assert isinstance(d.action, Switch) and not d.actions
    assert Policy().is_exclusive("llm")


def test_ties_go_to_the_card_used_least_recently() -> None:
    cards = Cards.of([(Card(0), 16 * GIB), (Card(1), 16 * GIB)])
    assert place(req("sdxl", "sdxl", 10), cards, PlaceContext()).gpus == (0,)
    recent = PlaceContext(used_s={0: 50.0, 1: 10.0})
    assert place(req("sdxl", "sdxl", 10), cards, recent).gpus == (1,)


def test_a_spanning_model_is_evicted_by_one_card_at_a_time() -> None:
    share = res("tp", "llm", 12.5)
    cards = two_cards().begin_load(0, share).begin_load(1, share).finish_load(0).finish_load(1)
    # foreign memory grew on both cards: each is over its room, and the span is idle
    cards = cards.with_foreign(0, 12 * GIB).with_foreign(1, 6 * GIB)
    d = decide(view(cards, [], [req("tp", "llm", 12.5)], spans={"tp": 2}))
    evicting = [g for g, a in d.actions if "tp" in getattr(a, "models", ())]
    assert len(evicting) == 1  # not both cards at once


def test_a_requested_unload_of_a_spanning_model_is_one_action() -> None:
    share = res("tp", "llm", 12.5)
    cards = two_cards().begin_load(0, share).begin_load(1, share).finish_load(0).finish_load(1)
    d = decide(view(cards, [], [req("tp", "llm", 12.5)], spans={"tp": 2}, to_unload={"tp": "asked"}))
    assert [(g, type(a).__name__) for g, a in d.actions] == [(0, "Evict")]


def test_a_model_that_fits_beside_a_resident_is_placed_before_one_that_must_evict() -> None:
    # Card 0 (23 GiB) holds B (12 GiB, idle), card 1 (15 GiB) holds A (13 GiB, idle). The heavy
    # C, waited for first, would evict B on card 0 (fewer bytes than A); the TTS fits beside
    # B there and nowhere else. Placed in arrival order, C would claim card 0 and send the TTS
    # to evict A on card 1: two evictions where one is enough.
    cards = loaded(loaded(two_cards(), 0, res("B", "llm", 12)), 1, res("A", "llm", 13))
    requests = [req("C", "sdxl", 12), req("tts", "tts", 4)]
    d = decide(view(cards, [(1, "C"), (2, "tts")], requests))
    switches = {gpu: a.plan for gpu, a in d.actions if isinstance(a, Switch)}
    assert switches[0].load == "tts" and not switches[0].evictions
    assert switches[1].load == "C" and [e.model for e in switches[1].evictions] == ["A"]


def test_touching_the_most_recently_used_model_keeps_the_cards() -> None:
    cards = loaded(loaded(two_cards(), 0, res("llm", "llm", 14)), 0, res("tts", "tts", 3))
    touched = cards.touch("llm")  # the TTS model was used after it
    before, after = cards.ledger(0).get("llm"), touched.ledger(0).get("llm")
    assert before is not None and after is not None and after.last_used > before.last_used
    assert touched.touch("llm") is touched  # a grant or release of a busy model builds nothing
