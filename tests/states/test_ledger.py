"""The ledger: byte arithmetic, frozen snapshots, and each change returning a new ledger."""

from __future__ import annotations

import dataclasses

import pytest

from states import GIB, Ledger, Resident, Tier, format_gib, gib_to_bytes

BUDGET = gib_to_bytes(15.5)

QWEN = Resident(
    "qwen-14b", "llm", gib_to_bytes(11.5), exclusive=True, offloadable=True, host_bytes=gib_to_bytes(11.5)
)
SDXL = Resident("sdxl-base", "sdxl", gib_to_bytes(10.5), exclusive=True)
SOVITS = Resident("gpt-sovits", "tts", gib_to_bytes(3.5))


def loaded(ledger: Ledger, *residents: Resident) -> Ledger:
    for r in residents:
        ledger = ledger.begin_load(r).finish_load()
    return ledger


# -- units -----------------------------------------------------------------------------------


def test_units() -> None:
    assert gib_to_bytes(1) == GIB == 1024**3
    assert gib_to_bytes(15.5) == 15 * GIB + GIB // 2
    assert format_gib(gib_to_bytes(11.5)) == "11.50 GiB"
    assert format_gib(0) == "0.00 GiB"


# -- reading ---------------------------------------------------------------------------------


def test_empty_ledger() -> None:
    ledger = Ledger(BUDGET)
    assert ledger.resident_bytes == 0
    assert ledger.committed_bytes == 0
    assert ledger.available_bytes == BUDGET
    assert ledger.free_bytes == BUDGET
    assert ledger.host_used_bytes == 0
    assert ledger.fits()
    assert ledger.gpu_residents == () and ledger.host_residents == ()


def test_committed_counts_residents_and_the_load_in_progress() -> None:
    ledger = loaded(Ledger(BUDGET), SOVITS).begin_load(QWEN)
    assert ledger.resident_bytes == gib_to_bytes(3.5)
    assert ledger.committed_bytes == gib_to_bytes(15)
    assert ledger.free_bytes == gib_to_bytes(0.5)
    assert ledger.fits()


def test_host_residents_hold_no_vram() -> None:
    ledger = Ledger(
        BUDGET,
        residents=(dataclasses.replace(QWEN, tier=Tier.HOST), SOVITS),
        host_budget_bytes=gib_to_bytes(32),
    )
    assert ledger.resident_bytes == ledger.committed_bytes == gib_to_bytes(3.5)
    assert ledger.host_used_bytes == gib_to_bytes(11.5)
    assert [r.model for r in ledger.gpu_residents] == ["gpt-sovits"]
    assert [r.model for r in ledger.host_residents] == ["qwen-14b"]


def test_foreign_bytes_reduce_available_and_free() -> None:
    ledger = Ledger(BUDGET, residents=(SOVITS,), foreign_bytes=gib_to_bytes(4))
    assert ledger.available_bytes == gib_to_bytes(11.5)
    assert ledger.free_bytes == gib_to_bytes(8)
    assert ledger.begin_load(QWEN).fits() is False  # 15 GiB committed, 11.5 available
    assert ledger.begin_load(SDXL).fits() is False
    assert ledger.begin_load(dataclasses.replace(SDXL, vram_bytes=gib_to_bytes(8))).fits()


def test_available_and_free_never_go_below_zero() -> None:
    ledger = Ledger(BUDGET, residents=(QWEN,), foreign_bytes=gib_to_bytes(20))
    assert ledger.available_bytes == 0
    assert ledger.free_bytes == 0
    assert not ledger.fits()


def test_committed_over_available_does_not_fit() -> None:
    over = Ledger(BUDGET, residents=(QWEN,)).begin_load(SDXL)
    assert over.committed_bytes == gib_to_bytes(22)
    assert over.free_bytes == 0
    assert not over.fits()


def test_with_foreign_replaces_and_clamps() -> None:
    ledger = Ledger(BUDGET, foreign_bytes=gib_to_bytes(1))
    assert ledger.with_foreign(gib_to_bytes(3)).foreign_bytes == gib_to_bytes(3)
    assert ledger.with_foreign(-5).foreign_bytes == 0
    assert ledger.foreign_bytes == gib_to_bytes(1)


def test_get_tier_of_on_gpu() -> None:
    ledger = Ledger(BUDGET, residents=(dataclasses.replace(QWEN, tier=Tier.HOST), SOVITS))
    assert ledger.get("gpt-sovits") == SOVITS
    assert ledger.get("nope") is None
    assert ledger.tier_of("gpt-sovits") is Tier.GPU
    assert ledger.tier_of("qwen-14b") is Tier.HOST
    assert ledger.tier_of("sdxl-base") is Tier.DISK
    assert ledger.on_gpu("gpt-sovits")
    assert not ledger.on_gpu("qwen-14b")
    assert not ledger.on_gpu("sdxl-base")


# -- validation ------------------------------------------------------------------------------


def test_negative_budget_rejected() -> None:
    with pytest.raises(ValueError, match="budget_bytes must be >= 0"):
        Ledger(-1)
    assert Ledger(0).available_bytes == 0


def test_duplicate_model_rejected() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        Ledger(BUDGET, residents=(SOVITS, SOVITS))
    with pytest.raises(ValueError, match="listed twice"):
        Ledger(BUDGET, residents=(QWEN, dataclasses.replace(QWEN, tier=Tier.HOST)))


def test_loading_model_cannot_also_be_resident() -> None:
    with pytest.raises(ValueError, match="both loading and resident"):
        Ledger(BUDGET, residents=(SOVITS,), loading=SOVITS)


def test_second_begin_load_rejected() -> None:
    ledger = Ledger(BUDGET).begin_load(QWEN)
    with pytest.raises(ValueError, match="'qwen-14b' is already in progress"):
        ledger.begin_load(SOVITS)


def test_finish_load_without_a_load_rejected() -> None:
    with pytest.raises(ValueError, match="no load in progress"):
        Ledger(BUDGET).finish_load()


def test_move_of_an_unknown_model_rejected() -> None:
    with pytest.raises(ValueError, match="'sdxl-base' is not in the ledger"):
        Ledger(BUDGET, residents=(SOVITS,)).move("sdxl-base", Tier.HOST)


# -- changing: new ledgers, the original unchanged --------------------------------------------


def test_ledger_is_frozen() -> None:
    ledger = Ledger(BUDGET)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ledger.budget_bytes = 0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        SOVITS.vram_bytes = 0  # type: ignore[misc]


def test_begin_load_returns_a_new_ledger() -> None:
    before = Ledger(BUDGET, residents=(SOVITS,))
    after = before.begin_load(QWEN)
    assert after is not before
    assert after.loading is not None and after.loading.model == "qwen-14b"
    assert after.loading.tier is Tier.GPU
    assert after.residents == (SOVITS,)
    assert before.loading is None
    assert before.committed_bytes == gib_to_bytes(3.5)


def test_begin_load_takes_the_model_out_of_a_lower_tier() -> None:
    before = Ledger(BUDGET, residents=(dataclasses.replace(QWEN, tier=Tier.HOST), SOVITS))
    after = before.begin_load(QWEN)
    assert after.get("qwen-14b") is None  # no longer listed on the host tier
    assert after.host_used_bytes == 0
    assert after.loading is not None and after.loading.tier is Tier.GPU
    assert before.tier_of("qwen-14b") is Tier.HOST


def test_finish_load_makes_a_resident_and_ticks_the_clock() -> None:
    before = Ledger(BUDGET, clock=7).begin_load(QWEN)
    after = before.finish_load()
    assert after.loading is None
    assert after.on_gpu("qwen-14b")
    assert after.clock == 8
    r = after.get("qwen-14b")
    assert r is not None and r.last_used == 8
    assert before.loading is not None and before.clock == 7 and before.residents == ()


def test_finish_load_records_the_measured_size() -> None:
    after = Ledger(BUDGET).begin_load(QWEN).finish_load(vram_bytes=gib_to_bytes(12.25))
    r = after.get("qwen-14b")
    assert r is not None and r.vram_bytes == gib_to_bytes(12.25)
    assert after.committed_bytes == gib_to_bytes(12.25)


def test_abort_load_frees_the_committed_bytes() -> None:
    before = loaded(Ledger(BUDGET), SOVITS).begin_load(QWEN)
    after = before.abort_load()
    assert after.loading is None
    assert after.committed_bytes == gib_to_bytes(3.5)
    assert [r.model for r in after.residents] == ["gpt-sovits"]
    assert before.loading is not None
    assert before.committed_bytes == gib_to_bytes(15)


def test_move_to_host_and_back() -> None:
    before = loaded(Ledger(BUDGET, host_budget_bytes=gib_to_bytes(32)), QWEN, SOVITS)
    on_host = before.move("qwen-14b", Tier.HOST)
    assert on_host.tier_of("qwen-14b") is Tier.HOST
    assert on_host.resident_bytes == gib_to_bytes(3.5)
    assert on_host.host_used_bytes == gib_to_bytes(11.5)
    assert before.tier_of("qwen-14b") is Tier.GPU
    assert before.host_used_bytes == 0
    back = on_host.move("qwen-14b", Tier.GPU)
    assert back.tier_of("qwen-14b") is Tier.GPU
    assert back.residents == before.residents  # order and last_used kept


def test_move_to_disk_removes() -> None:
    before = loaded(Ledger(BUDGET), QWEN, SOVITS)
    after = before.move("qwen-14b", Tier.DISK)
    assert after.get("qwen-14b") is None
    assert after.tier_of("qwen-14b") is Tier.DISK
    assert [r.model for r in after.residents] == ["gpt-sovits"]
    assert before.get("qwen-14b") is not None


def test_touch_records_a_use() -> None:
    before = loaded(Ledger(BUDGET), QWEN, SOVITS)  # qwen used at 1, gpt-sovits at 2
    after = before.touch("qwen-14b")
    assert after.clock == 3
    q, s = after.get("qwen-14b"), after.get("gpt-sovits")
    assert q is not None and s is not None
    assert q.last_used == 3 > s.last_used == 2
    bq = before.get("qwen-14b")
    assert bq is not None and bq.last_used == 1
    assert before.clock == 2


def test_touch_of_an_unknown_model_changes_nothing() -> None:
    ledger = loaded(Ledger(BUDGET), SOVITS)
    assert ledger.touch("nope") is ledger


# -- describe --------------------------------------------------------------------------------


def test_describe_nothing() -> None:
    assert Ledger(BUDGET).describe() == "nothing resident; budget 15.50 GiB"


def test_describe_mentions_models_loading_foreign_and_gib() -> None:
    ledger = loaded(Ledger(BUDGET, foreign_bytes=gib_to_bytes(0.5)), SOVITS).begin_load(QWEN)
    assert ledger.describe() == (
        "gpt-sovits (3.50 GiB), qwen-14b loading (11.50 GiB), foreign processes 0.50 GiB; budget 15.50 GiB"
    )


def test_describe_leaves_out_host_residents() -> None:
    ledger = Ledger(BUDGET, residents=(dataclasses.replace(QWEN, tier=Tier.HOST), SDXL))
    text = ledger.describe()
    assert "sdxl-base (10.50 GiB)" in text
    assert "qwen-14b" not in text
    assert "GiB" in text


def test_available_never_exceeds_the_budget() -> None:
    try:
        ledger = Ledger(BUDGET, foreign_bytes=-gib_to_bytes(1))
    except ValueError:
        return  # rejecting the figure is a fine answer too
    assert ledger.available_bytes <= ledger.budget_bytes
