"""Adopting a model that is on the GPU already (``states.adopt.adoption``), with the Model
Management Module's budget (15.5 GiB) and sizes."""

from __future__ import annotations

import pytest

from states import Ledger, PlanRequest, Policy, Resident, Tier, gib_to_bytes
from states.adopt import adoption

BUDGET = gib_to_bytes(15.5)
GIB = gib_to_bytes(1)
POLICY = Policy()  # llm and sdxl exclusive
LIGHT_LLM = Policy(exclusive_kinds=frozenset({"sdxl"}))


def sdxl_resident() -> Ledger:
    r = Resident("sdxl-base", "sdxl", gib_to_bytes(10.5), exclusive=True, last_used=1)
    return Ledger(budget_bytes=BUDGET, residents=(r,), clock=1)


def llm(gib: float) -> PlanRequest:
    return PlanRequest("qwen", "llm", gib_to_bytes(gib), configured_bytes=gib_to_bytes(gib))


def test_a_model_that_fits_becomes_the_most_recent_gpu_resident() -> None:
    # Its bytes were foreign memory until now: adopting moves them from foreign to resident.
    ledger = Ledger(budget_bytes=BUDGET, foreign_bytes=9 * GIB)
    after = adoption(llm(9.5), ledger, 9 * GIB, POLICY)
    assert after is not None
    r = after.get("qwen")
    assert r is not None and r.tier is Tier.GPU and r.exclusive
    assert r.vram_bytes == gib_to_bytes(9.5)  # its estimate, larger than what it holds now
    assert r.last_used == after.clock == ledger.clock + 1
    assert after.foreign_bytes == 0 and after.committed_bytes == gib_to_bytes(9.5)
    assert after.loading is None and after.fits()


def test_it_is_counted_at_what_it_holds_when_that_is_more_than_its_estimate() -> None:
    after = adoption(llm(6.0), Ledger(budget_bytes=BUDGET, foreign_bytes=7 * GIB), 7 * GIB, POLICY)
    assert after is not None and after.committed_bytes == 7 * GIB


def test_an_exclusive_model_is_not_adopted_beside_another() -> None:
    ledger = sdxl_resident().with_foreign(3 * GIB)
    assert adoption(llm(3.0), ledger, 3 * GIB, POLICY) is None
    # A light LLM may share the card with SDXL: 10.5 + 3.5 fits 15.5.
    after = adoption(llm(3.5), ledger, 3 * GIB, LIGHT_LLM)
    assert after is not None and {r.model for r in after.gpu_residents} == {"sdxl-base", "qwen"}
    assert after.foreign_bytes == 0


def test_a_model_over_the_budget_is_not_adopted() -> None:
    ledger = sdxl_resident().with_foreign(5 * GIB)
    assert adoption(llm(5.5), ledger, 5 * GIB, LIGHT_LLM) is None  # 10.5 + 5.5 > 15.5
    # Its estimate counts: it holds 4.5 (10.5 + 4.5 would fit) but a load of it commits 5.5.
    assert adoption(llm(5.5), sdxl_resident().with_foreign(4 * GIB), 4 * GIB, LIGHT_LLM) is None
    # Other processes' memory leaves less room: 10.5 + 3.5 + 2 (someone else's) > 15.5.
    assert adoption(llm(3.5), sdxl_resident().with_foreign(5 * GIB), 3 * GIB, LIGHT_LLM) is None


def test_nothing_is_adopted_twice_or_during_a_load() -> None:
    ledger = Ledger(budget_bytes=BUDGET)
    after = adoption(llm(3.0), ledger, 3 * GIB, POLICY)
    assert after is not None
    assert adoption(llm(3.0), after, 3 * GIB, POLICY) is None  # in the ledger already
    loading = ledger.begin_load(Resident("tts", "tts", GIB))
    assert adoption(llm(3.0), loading, 3 * GIB, POLICY) is None


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="held_bytes must be > 0"):
        adoption(llm(3.0), Ledger(budget_bytes=BUDGET), 0, POLICY)
    with pytest.raises(ValueError, match="reservation"):
        adoption(
            PlanRequest("ext-1", "external", GIB, external=True), Ledger(budget_bytes=BUDGET), GIB, POLICY
        )
