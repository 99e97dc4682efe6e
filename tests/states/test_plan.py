"""Planning a switch: evictions, tiers, deferral and errors, with the Model Management Module's
figures (a 15.5 GiB budget; qwen-14b 11.5 GiB, sdxl-base 10.5 GiB, sdxl-lora-controlnet 14.5 GiB,
gpt-sovits 3.5 GiB)."""

from __future__ import annotations

import pytest

from states import (
    Deferred,
    Eviction,
    InsufficientVRAM,
    Ledger,
    OrchestratorError,
    Plan,
    PlanRequest,
    Policy,
    Resident,
    Tier,
    gib_to_bytes,
    plan,
)
from states.plan import SwitchCosts, plan_cost_s

BUDGET = gib_to_bytes(15.5)
POLICY = Policy()

SIZES_GIB = {
    "qwen-14b": 11.5,
    "sdxl-base": 10.5,
    "sdxl-lora-controlnet": 14.5,
    "gpt-sovits": 3.5,
}
KINDS = {
    "qwen-14b": "llm",
    "sdxl-base": "sdxl",
    "sdxl-lora-controlnet": "sdxl",
    "gpt-sovits": "tts",
}


def res(
    model: str,
    gib: float | None = None,
    *,
    kind: str | None = None,
    tier: Tier = Tier.GPU,
    host_gib: float = 0,
    last_used: int = 0,
) -> Resident:
    kind = kind or KINDS[model]
    return Resident(
        model=model,
        kind=kind,
        vram_bytes=gib_to_bytes(gib if gib is not None else SIZES_GIB[model]),
        tier=tier,
        exclusive=POLICY.is_exclusive(kind),
        offloadable=host_gib > 0,
        host_bytes=gib_to_bytes(host_gib),
        last_used=last_used,
    )


def req(model: str, gib: float | None = None, *, kind: str | None = None, host_gib: float = 0) -> PlanRequest:
    return PlanRequest(
        model=model,
        kind=kind or KINDS[model],
        vram_bytes=gib_to_bytes(gib if gib is not None else SIZES_GIB[model]),
        offloadable=host_gib > 0,
        host_bytes=gib_to_bytes(host_gib),
    )


def loaded(ledger: Ledger, *residents: Resident) -> Ledger:
    """Load each resident in turn (so the later ones are the more recently used)."""
    for r in residents:
        ledger = ledger.begin_load(r).finish_load()
    return ledger


def must_plan(request: PlanRequest, ledger: Ledger, policy: Policy = POLICY) -> Plan:
    result = plan(request, ledger, policy)
    assert isinstance(result, Plan), result
    return result


def evicted(p: Plan) -> list[tuple[str, Tier, Tier]]:
    return [(e.model, e.from_tier, e.to_tier) for e in p.evictions]


# -- too big for the budget ------------------------------------------------------------------


def test_model_bigger_than_the_budget_is_insufficient_vram() -> None:
    with pytest.raises(InsufficientVRAM) as info:
        plan(req("qwen-32b", 18.5, kind="llm"), Ledger(BUDGET), POLICY)
    err = info.value
    assert isinstance(err, RuntimeError)
    assert isinstance(err, OrchestratorError)
    assert err.model == "qwen-32b"
    assert err.required_bytes == gib_to_bytes(18.5)
    assert err.budget_bytes == BUDGET
    assert err.free_bytes == BUDGET
    assert err.shortfall_bytes == gib_to_bytes(3)
    msg = str(err)
    assert "'qwen-32b'" in msg
    assert "18.50 GiB" in msg
    assert "15.50 GiB budget" in msg
    assert "short 3.00 GiB" in msg
    assert "smaller variant" in msg  # the advice for a model that can never fit


def test_controlnet_pipeline_too_big_for_a_smaller_budget() -> None:
    with pytest.raises(InsufficientVRAM) as info:
        plan(req("sdxl-lora-controlnet"), Ledger(gib_to_bytes(12)), POLICY)
    assert info.value.shortfall_bytes == gib_to_bytes(2.5)
    assert "'sdxl-lora-controlnet'" in str(info.value)
    assert "14.50 GiB" in str(info.value) and "12.00 GiB" in str(info.value)


def test_too_big_is_an_error_even_with_foreign_memory_and_residents() -> None:
    ledger = loaded(Ledger(BUDGET, foreign_bytes=gib_to_bytes(4)), res("gpt-sovits"))
    with pytest.raises(InsufficientVRAM):
        plan(req("qwen-32b", 16, kind="llm"), ledger, POLICY)


def test_a_model_of_exactly_the_budget_fits() -> None:
    p = must_plan(req("big", 15.5, kind="llm"), loaded(Ledger(BUDGET), res("gpt-sovits")))
    assert evicted(p) == [("gpt-sovits", Tier.GPU, Tier.DISK)]
    assert p.after.committed_bytes == BUDGET
    assert p.after.fits()


# -- caller bugs -------------------------------------------------------------------------------


def test_planning_for_a_model_already_on_the_gpu_is_a_value_error() -> None:
    ledger = loaded(Ledger(BUDGET), res("qwen-14b"))
    with pytest.raises(ValueError, match="'qwen-14b' is already on the GPU"):
        plan(req("qwen-14b"), ledger, POLICY)


def test_planning_during_a_load_is_a_value_error() -> None:
    ledger = Ledger(BUDGET).begin_load(res("qwen-14b"))
    with pytest.raises(ValueError, match="already in progress"):
        plan(req("gpt-sovits"), ledger, POLICY)


# -- empty GPU and plan.after ----------------------------------------------------------------


def test_load_onto_an_empty_gpu() -> None:
    ledger = Ledger(BUDGET)
    p = must_plan(req("qwen-14b"), ledger)
    assert p.load == "qwen-14b"
    assert p.load_bytes == gib_to_bytes(11.5)
    assert p.from_tier is Tier.DISK
    assert p.evictions == ()
    assert p.gpu_evictions == ()
    after = p.after
    assert after.loading is not None
    assert after.loading.model == "qwen-14b"
    assert after.loading.kind == "llm"
    assert after.loading.exclusive
    assert after.loading.tier is Tier.GPU
    assert after.committed_bytes == gib_to_bytes(11.5)
    assert after.fits()
    assert ledger.loading is None  # the ledger planned from is untouched


def test_after_carries_the_request_offload_facts() -> None:
    p = must_plan(req("sdxl-base", host_gib=6.5), Ledger(BUDGET))
    assert p.after.loading is not None
    assert p.after.loading.offloadable
    assert p.after.loading.host_bytes == gib_to_bytes(6.5)
    done = p.after.finish_load()
    assert done.on_gpu("sdxl-base")


# -- exclusive kinds -------------------------------------------------------------------------


def test_exclusive_kind_evicts_the_other_exclusive_resident() -> None:
    ledger = loaded(Ledger(BUDGET), res("qwen-14b"))
    p = must_plan(req("sdxl-base"), ledger)
    assert evicted(p) == [("qwen-14b", Tier.GPU, Tier.DISK)]
    assert not p.after.on_gpu("qwen-14b")
    assert p.after.committed_bytes == gib_to_bytes(10.5)


def test_exclusive_kind_evicts_the_other_even_when_both_would_fit() -> None:
    big_card = gib_to_bytes(80)
    ledger = loaded(Ledger(big_card), res("qwen-14b"))
    p = must_plan(req("sdxl-base"), ledger)
    assert evicted(p) == [("qwen-14b", Tier.GPU, Tier.DISK)]
    assert p.after.free_bytes == big_card - gib_to_bytes(10.5)


def test_two_sdxl_pipelines_are_exclusive_too() -> None:
    ledger = loaded(Ledger(BUDGET), res("sdxl-base"))
    p = must_plan(req("sdxl-lora-controlnet"), ledger)
    assert [e.model for e in p.gpu_evictions] == ["sdxl-base"]


def test_a_policy_without_exclusive_kinds_lets_heavies_share() -> None:
    shared = Policy(exclusive_kinds=frozenset())
    ledger = loaded(Ledger(gib_to_bytes(80)), res("qwen-14b", kind="llm"))
    p = must_plan(req("sdxl-base"), ledger, shared)
    assert p.evictions == ()
    assert p.after.loading is not None and not p.after.loading.exclusive


def test_exclusive_request_keeps_a_light_rider_that_fits() -> None:
    ledger = loaded(Ledger(BUDGET), res("sdxl-base"), res("gpt-sovits"))
    p = must_plan(req("qwen-14b"), ledger)  # 11.5 + 3.5 = 15 <= 15.5
    assert evicted(p) == [("sdxl-base", Tier.GPU, Tier.DISK)]
    assert p.after.on_gpu("gpt-sovits")


def test_exclusive_request_evicts_the_light_rider_too_when_needed() -> None:
    ledger = loaded(Ledger(BUDGET), res("qwen-14b"), res("gpt-sovits"))
    p = must_plan(req("sdxl-lora-controlnet"), ledger)  # 14.5 + 3.5 > 15.5
    assert evicted(p) == [
        ("qwen-14b", Tier.GPU, Tier.DISK),  # the exclusive conflict first
        ("gpt-sovits", Tier.GPU, Tier.DISK),
    ]
    assert p.after.gpu_residents == ()


# -- light kinds -----------------------------------------------------------------------------


def test_light_model_rides_along_with_a_heavy_one_when_it_fits() -> None:
    ledger = loaded(Ledger(BUDGET), res("qwen-14b"))
    p = must_plan(req("gpt-sovits"), ledger)
    assert p.evictions == ()
    assert p.after.on_gpu("qwen-14b")
    assert p.after.committed_bytes == gib_to_bytes(15)
    assert p.after.loading is not None and not p.after.loading.exclusive


def test_light_model_evicts_the_heavy_when_it_does_not_fit() -> None:
    ledger = loaded(Ledger(BUDGET), res("sdxl-lora-controlnet"))
    p = must_plan(req("gpt-sovits"), ledger)  # 14.5 + 3.5 > 15.5
    assert evicted(p) == [("sdxl-lora-controlnet", Tier.GPU, Tier.DISK)]


def test_light_evicted_before_heavy_even_when_the_heavy_is_older() -> None:
    # sdxl-base used first (oldest), then kokoro: 10.5 + 3.5 + 1 = 15 GiB of 15.5.
    ledger = loaded(Ledger(BUDGET), res("sdxl-base"), res("gpt-sovits"), res("kokoro", 1, kind="tts"))
    ledger = ledger.touch("gpt-sovits")
    p = must_plan(req("piper", 1, kind="tts"), ledger)
    assert evicted(p) == [("kokoro", Tier.GPU, Tier.DISK)]
    assert p.after.on_gpu("sdxl-base")


@pytest.mark.parametrize(
    ("touched", "victim"),
    [("gpt-sovits", "kokoro"), ("kokoro", "gpt-sovits")],
)
def test_least_recently_used_light_goes_first(touched: str, victim: str) -> None:
    ledger = loaded(Ledger(BUDGET), res("sdxl-base"), res("gpt-sovits"), res("kokoro", 1, kind="tts"))
    ledger = ledger.touch("sdxl-base").touch(touched)
    p = must_plan(req("piper", 1, kind="tts"), ledger)
    assert [e.model for e in p.evictions] == [victim]


def test_light_evictions_continue_in_lru_order_until_it_fits() -> None:
    ledger = Ledger(
        BUDGET,
        residents=(
            res("qwen-14b", last_used=1),
            res("kokoro", 1, kind="tts", last_used=2),
            res("piper", 1, kind="tts", last_used=3),
            res("bark", 1.5, kind="tts", last_used=4),
        ),
    )  # 15 GiB used, 0.5 free
    p = must_plan(req("gpt-sovits"), ledger)  # needs 3.5: kokoro + piper + bark = 4 GiB freed
    assert [e.model for e in p.evictions] == ["kokoro", "piper", "bark"]
    assert p.after.on_gpu("qwen-14b")


def test_light_request_falls_back_to_evicting_the_heavy() -> None:
    ledger = Ledger(
        BUDGET,
        residents=(
            res("sdxl-lora-controlnet", 13.5, last_used=5),
            res("kokoro", 1, kind="tts", last_used=1),
        ),
    )  # 14.5 used, 1 free
    p = must_plan(req("gpt-sovits"), ledger)
    # kokoro was picked first (light before heavy), but once the heavy one had to go its
    # room alone was enough: kokoro stays.
    assert [e.model for e in p.evictions] == ["sdxl-lora-controlnet"]
    assert [r.model for r in p.after.gpu_residents] == ["kokoro"]


def test_no_more_evictions_than_needed() -> None:
    # Room for 9 GiB beside a 3.5 GiB TTS and an 11.5 GiB reservation is not enough (0.5
    # free); the TTS goes first by the rule, then the LLM-sized one: the TTS came back.
    ledger = Ledger(
        BUDGET,
        residents=(
            res("gpt-sovits", 3.5, kind="tts", last_used=1),
            res("qwen-14b", 11.5, last_used=2),
        ),
    )
    ext = PlanRequest(model="ext", kind="external", vram_bytes=gib_to_bytes(9), external=True)
    p = must_plan(ext, ledger)
    assert [e.model for e in p.evictions] == ["qwen-14b"]
    assert p.after.on_gpu("gpt-sovits")
    assert p.after.committed_bytes <= p.after.budget_bytes


# -- foreign memory: Deferred ----------------------------------------------------------------


def test_foreign_bytes_make_a_fitting_request_deferred() -> None:
    ledger = loaded(Ledger(BUDGET, foreign_bytes=gib_to_bytes(5)), res("gpt-sovits"))
    result = plan(req("qwen-14b"), ledger, POLICY)
    assert isinstance(result, Deferred)
    assert result.model == "qwen-14b"
    assert result.needed_bytes == gib_to_bytes(11.5)
    assert result.available_bytes == gib_to_bytes(10.5)
    assert result.foreign_bytes == gib_to_bytes(5)
    assert "'qwen-14b'" in result.reason
    assert "5.00 GiB" in result.reason
    assert "11.50 GiB" in result.reason and "10.50 GiB" in result.reason


def test_foreign_bytes_that_eviction_can_make_up_for_give_a_plan() -> None:
    ledger = loaded(Ledger(BUDGET, foreign_bytes=gib_to_bytes(2)), res("gpt-sovits"))
    p = must_plan(req("qwen-14b"), ledger)  # 13.5 available: gpt-sovits must go
    assert evicted(p) == [("gpt-sovits", Tier.GPU, Tier.DISK)]
    assert p.after.fits()


def test_deferred_on_an_empty_gpu() -> None:
    result = plan(req("sdxl-lora-controlnet"), Ledger(BUDGET, foreign_bytes=gib_to_bytes(1.5)), POLICY)
    assert isinstance(result, Deferred)
    assert "1.50 GiB" in result.reason


# -- the HOST tier ---------------------------------------------------------------------------


def test_offloadable_victim_goes_to_host_when_there_is_room() -> None:
    ledger = loaded(Ledger(BUDGET, host_budget_bytes=gib_to_bytes(32)), res("sdxl-base", host_gib=6.5))
    p = must_plan(req("qwen-14b"), ledger)
    assert evicted(p) == [("sdxl-base", Tier.GPU, Tier.HOST)]
    assert p.after.tier_of("sdxl-base") is Tier.HOST
    assert p.after.host_used_bytes == gib_to_bytes(6.5)
    assert p.after.committed_bytes == gib_to_bytes(11.5)


def test_offloadable_victim_goes_to_disk_without_a_host_tier() -> None:
    ledger = loaded(Ledger(BUDGET), res("sdxl-base", host_gib=6.5))  # host_budget_bytes=0
    p = must_plan(req("qwen-14b"), ledger)
    assert evicted(p) == [("sdxl-base", Tier.GPU, Tier.DISK)]
    assert p.after.get("sdxl-base") is None


def test_a_plan_prices_an_offload_as_an_offload_and_an_unload_as_an_unload() -> None:
    costs = {
        "sdxl-base": SwitchCosts(load_s=6.0, restore_s=0.13, unload_s=2.5, offload_s=0.05),
        "qwen-14b": SwitchCosts(load_s=20.0, restore_s=0.5, unload_s=6.0, offload_s=0.05),
    }
    kept = must_plan(
        req("qwen-14b"),
        loaded(Ledger(BUDGET, host_budget_bytes=gib_to_bytes(32)), res("sdxl-base", host_gib=6.5)),
    )
    assert evicted(kept) == [("sdxl-base", Tier.GPU, Tier.HOST)]
    assert plan_cost_s(kept, costs) == pytest.approx(0.05 + 20.0)  # its offload, then qwen's load
    dropped = must_plan(req("qwen-14b"), loaded(Ledger(BUDGET), res("sdxl-base", host_gib=6.5)))
    assert evicted(dropped) == [("sdxl-base", Tier.GPU, Tier.DISK)]
    assert plan_cost_s(dropped, costs) == pytest.approx(2.5 + 20.0)  # its unload


def test_offloadable_victim_goes_to_disk_when_its_copy_is_too_big() -> None:
    ledger = loaded(Ledger(BUDGET, host_budget_bytes=gib_to_bytes(6)), res("sdxl-base", host_gib=6.5))
    p = must_plan(req("qwen-14b"), ledger)
    assert evicted(p) == [("sdxl-base", Tier.GPU, Tier.DISK)]


def test_victim_that_cannot_offload_goes_to_disk_despite_room() -> None:
    ledger = loaded(Ledger(BUDGET, host_budget_bytes=gib_to_bytes(64)), res("sdxl-base"))
    p = must_plan(req("qwen-14b"), ledger)
    assert evicted(p) == [("sdxl-base", Tier.GPU, Tier.DISK)]


def test_full_host_tier_drops_an_older_copy_for_a_more_recent_victim() -> None:
    ledger = Ledger(
        BUDGET,
        residents=(
            res("sdxl-lora-controlnet", tier=Tier.HOST, host_gib=9, last_used=1),
            res("sdxl-base", host_gib=6.5, last_used=2),
        ),
        host_budget_bytes=gib_to_bytes(12),
        clock=2,
    )
    p = must_plan(req("qwen-14b"), ledger)
    assert p.evictions == (
        Eviction("sdxl-lora-controlnet", Tier.HOST, Tier.DISK),  # room first
        Eviction("sdxl-base", Tier.GPU, Tier.HOST),
    )
    assert p.gpu_evictions == (Eviction("sdxl-base", Tier.GPU, Tier.HOST),)
    assert p.after.get("sdxl-lora-controlnet") is None
    assert p.after.tier_of("sdxl-base") is Tier.HOST
    assert p.after.host_used_bytes == gib_to_bytes(6.5) <= p.after.host_budget_bytes


def test_full_host_tier_keeps_a_more_recent_copy() -> None:
    ledger = Ledger(
        BUDGET,
        residents=(
            res("sdxl-lora-controlnet", tier=Tier.HOST, host_gib=9, last_used=5),
            res("sdxl-base", host_gib=6.5, last_used=2),
        ),
        host_budget_bytes=gib_to_bytes(12),
        clock=5,
    )
    p = must_plan(req("qwen-14b"), ledger)
    assert evicted(p) == [("sdxl-base", Tier.GPU, Tier.DISK)]
    assert p.after.tier_of("sdxl-lora-controlnet") is Tier.HOST


def test_host_copies_that_still_fit_are_kept() -> None:
    ledger = Ledger(
        BUDGET,
        residents=(
            res("sdxl-lora-controlnet", tier=Tier.HOST, host_gib=9, last_used=1),
            res("sdxl-base", host_gib=6.5, last_used=2),
        ),
        host_budget_bytes=gib_to_bytes(32),
    )
    p = must_plan(req("qwen-14b"), ledger)
    assert evicted(p) == [("sdxl-base", Tier.GPU, Tier.HOST)]
    assert p.after.host_used_bytes == gib_to_bytes(15.5)


def test_restore_from_host_has_from_tier_host() -> None:
    ledger = Ledger(
        BUDGET,
        residents=(
            res("qwen-14b", tier=Tier.HOST, host_gib=11.5, last_used=1),
            res("sdxl-base", host_gib=10.5, last_used=2),
        ),
        host_budget_bytes=gib_to_bytes(12),
        clock=2,
    )
    p = must_plan(req("qwen-14b", host_gib=11.5), ledger)
    assert p.from_tier is Tier.HOST
    # The restored model leaves the host tier, so its room takes the evicted pipeline's copy,
    # and no HOST->DISK eviction is planned for the model being restored.
    assert evicted(p) == [("sdxl-base", Tier.GPU, Tier.HOST)]
    assert p.after.loading is not None and p.after.loading.model == "qwen-14b"
    assert p.after.get("qwen-14b") is None
    assert [r.model for r in p.after.host_residents] == ["sdxl-base"]
    assert p.after.host_used_bytes == gib_to_bytes(10.5)
    assert ledger.tier_of("qwen-14b") is Tier.HOST  # untouched


def test_restore_from_host_onto_an_empty_gpu() -> None:
    ledger = Ledger(
        BUDGET, residents=(res("sdxl-base", tier=Tier.HOST, host_gib=6.5),), host_budget_bytes=gib_to_bytes(8)
    )
    p = must_plan(req("sdxl-base", host_gib=6.5), ledger)
    assert p.from_tier is Tier.HOST
    assert p.evictions == ()
    assert p.after.host_used_bytes == 0


def test_light_victim_offloads_too() -> None:
    ledger = loaded(
        Ledger(BUDGET, host_budget_bytes=gib_to_bytes(4)), res("qwen-14b"), res("gpt-sovits", host_gib=2)
    )
    p = must_plan(req("sdxl-lora-controlnet"), ledger)
    assert evicted(p) == [("qwen-14b", Tier.GPU, Tier.DISK), ("gpt-sovits", Tier.GPU, Tier.HOST)]
