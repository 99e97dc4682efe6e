"""The state machine: every legal row of ``TRANSITIONS``, every illegal (trigger, state) pair,
and the rules that say which ACTIVE state a ledger reports."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from states import (
    TRANSITIONS,
    IllegalTransition,
    InsufficientVRAM,
    Ledger,
    ModelMachine,
    OrchestratorError,
    Resident,
    State,
    Tier,
    active_state,
    gib_to_bytes,
)
from states.machine import STABLE, TRIGGERS

BUDGET = gib_to_bytes(15.5)

QWEN = Resident("qwen-14b", "llm", gib_to_bytes(11.5), exclusive=True)
SDXL = Resident("sdxl-base", "sdxl", gib_to_bytes(10.5), exclusive=True)
SOVITS = Resident("gpt-sovits", "tts", gib_to_bytes(3.5))

# The ledger that makes each stable state the active one.
LEDGER_FOR: dict[State, Ledger] = {
    State.IDLE: Ledger(BUDGET),
    State.LLM_ACTIVE: Ledger(BUDGET, residents=(QWEN,)),
    State.SDXL_ACTIVE: Ledger(BUDGET, residents=(SDXL,)),
    State.TTS_ACTIVE: Ledger(BUDGET, residents=(SOVITS,)),
}
# A planned ledger (a load committed) that fits the budget, for begin_switch.
FITTING_PLAN = Ledger(BUDGET, residents=(SOVITS,)).begin_load(QWEN)


def machine_in(state: State) -> ModelMachine:
    """A machine brought into ``state`` through legal triggers only."""
    m = ModelMachine()
    if state is State.SWITCHING:
        m.fire("begin_switch", FITTING_PLAN)
    elif state is not State.IDLE:
        m.fire("settle", LEDGER_FOR[state])
    assert m.state is state
    return m


def _sources(row: dict[str, object]) -> list[State]:
    src = row["source"]
    return list(src) if isinstance(src, list) else [src]  # type: ignore[list-item]


def _table_pairs() -> set[tuple[str, State]]:
    return {(row["trigger"], s) for row in TRANSITIONS for s in _sources(row)}


# -- the table itself ----------------------------------------------------------------------


def test_table_has_exactly_the_documented_rows() -> None:
    expected = (
        {("begin_switch", s) for s in STABLE}
        | {("finish_switch", State.SWITCHING), ("fail_switch", State.SWITCHING)}
        | {("settle", s) for s in STABLE}
    )
    assert _table_pairs() == expected
    assert {row["trigger"] for row in TRANSITIONS} == set(TRIGGERS)


def test_machine_starts_idle() -> None:
    assert ModelMachine().state is State.IDLE


# -- legal transitions ---------------------------------------------------------------------


@pytest.mark.parametrize("start", STABLE, ids=lambda s: s.name)
def test_begin_switch_from_each_stable_state(start: State) -> None:
    m = machine_in(start)
    assert m.fire("begin_switch", FITTING_PLAN) is State.SWITCHING
    assert m.state is State.SWITCHING


@pytest.mark.parametrize("trigger", ["finish_switch", "fail_switch"])
@pytest.mark.parametrize("dest", STABLE, ids=lambda s: s.name)
def test_switch_ends_where_the_ledger_says(trigger: str, dest: State) -> None:
    m = machine_in(State.SWITCHING)
    assert m.fire(trigger, LEDGER_FOR[dest]) is dest
    assert m.state is dest is active_state(LEDGER_FOR[dest])


@pytest.mark.parametrize("dest", STABLE, ids=lambda s: s.name)
@pytest.mark.parametrize("start", STABLE, ids=lambda s: s.name)
def test_settle_from_each_stable_state_lands_where_the_ledger_says(start: State, dest: State) -> None:
    m = machine_in(start)
    assert m.fire("settle", LEDGER_FOR[dest]) is dest
    assert m.state is dest


def test_a_full_switch_cycle() -> None:
    """IDLE -> SWITCHING -> LLM_ACTIVE -> SWITCHING -> SDXL_ACTIVE, through the ledger's steps."""
    m = ModelMachine()
    ledger = Ledger(BUDGET)
    ledger = ledger.begin_load(QWEN)
    assert m.fire("begin_switch", ledger) is State.SWITCHING
    ledger = ledger.finish_load()
    assert m.fire("finish_switch", ledger) is State.LLM_ACTIVE
    ledger = ledger.move("qwen-14b", Tier.DISK).begin_load(SDXL)
    assert m.fire("begin_switch", ledger) is State.SWITCHING
    ledger = ledger.finish_load()
    assert m.fire("finish_switch", ledger) is State.SDXL_ACTIVE


def test_failed_switch_after_eviction_lands_idle() -> None:
    m = machine_in(State.LLM_ACTIVE)
    planned = Ledger(BUDGET).begin_load(SDXL)
    m.fire("begin_switch", planned)
    assert m.fire("fail_switch", planned.abort_load()) is State.IDLE


def test_switch_to_a_light_model_beside_a_heavy_one_reports_the_heavy() -> None:
    m = machine_in(State.LLM_ACTIVE)
    planned = LEDGER_FOR[State.LLM_ACTIVE].begin_load(SOVITS)
    m.fire("begin_switch", planned)
    assert m.fire("finish_switch", planned.finish_load()) is State.LLM_ACTIVE


# -- illegal transitions -------------------------------------------------------------------

ALL_STATES = list(State)
ILLEGAL = sorted(
    ((t, s) for t in TRIGGERS for s in ALL_STATES if (t, s) not in _table_pairs()),
    key=lambda p: (p[0], p[1].name),
)


def test_the_illegal_pairs_are_the_documented_ones() -> None:
    assert set(ILLEGAL) == (
        {("begin_switch", State.SWITCHING), ("settle", State.SWITCHING)}
        | {("finish_switch", s) for s in STABLE}
        | {("fail_switch", s) for s in STABLE}
    )


def _assert_illegal(m: ModelMachine, trigger: str, ledger: Ledger) -> None:
    before = m.state
    with pytest.raises(IllegalTransition) as info:
        m.fire(trigger, ledger)
    err = info.value
    assert str(err) == f"can't handle {trigger} when state={before.name}"
    assert err.trigger == trigger
    assert err.state == before.name
    assert isinstance(err, OrchestratorError)
    assert isinstance(err, RuntimeError)
    assert m.state is before


@pytest.mark.parametrize(("trigger", "state"), ILLEGAL, ids=lambda x: x if isinstance(x, str) else x.name)
@pytest.mark.parametrize("ledger_state", STABLE, ids=lambda s: f"ledger-{s.name}")
def test_illegal_trigger_raises_and_changes_nothing(trigger: str, state: State, ledger_state: State) -> None:
    m = machine_in(state)
    _assert_illegal(m, trigger, LEDGER_FOR[ledger_state])


def test_illegal_message_example() -> None:
    m = machine_in(State.LLM_ACTIVE)
    with pytest.raises(IllegalTransition, match=r"^can't handle finish_switch when state=LLM_ACTIVE$"):
        m.fire("finish_switch", LEDGER_FOR[State.LLM_ACTIVE])


@pytest.mark.parametrize("state", ALL_STATES, ids=lambda s: s.name)
@pytest.mark.parametrize("trigger", ["explode", "to_IDLE", "trigger", "finish_load", ""])
def test_unknown_trigger_is_illegal(state: State, trigger: str) -> None:
    m = machine_in(state)
    _assert_illegal(m, trigger, LEDGER_FOR[State.IDLE])


def test_machine_still_works_after_an_illegal_trigger() -> None:
    m = ModelMachine()
    with pytest.raises(IllegalTransition):
        m.fire("finish_switch", Ledger(BUDGET))
    assert m.fire("begin_switch", FITTING_PLAN) is State.SWITCHING
    assert m.fire("finish_switch", FITTING_PLAN.finish_load()) is State.LLM_ACTIVE


def test_trigger_without_a_ledger_is_a_type_error() -> None:
    m = ModelMachine()
    with pytest.raises(TypeError, match="ledger"):
        m.fire("settle", None)  # type: ignore[arg-type]
    assert m.state is State.IDLE


# -- begin_switch guard: the plan must fit -------------------------------------------------


@pytest.mark.parametrize("start", STABLE, ids=lambda s: s.name)
def test_begin_switch_with_a_plan_that_does_not_fit(start: State) -> None:
    m = machine_in(start)
    # qwen-14b stays while sdxl-base loads: 22 GiB committed of 15.5.
    planned = Ledger(BUDGET, residents=(QWEN,)).begin_load(SDXL)
    assert not planned.fits()
    with pytest.raises(InsufficientVRAM) as info:
        m.fire("begin_switch", planned)
    err = info.value
    assert m.state is start
    assert err.model == "sdxl-base"
    assert err.required_bytes == gib_to_bytes(10.5)  # the model's own size, not the plan's total
    assert err.free_bytes == BUDGET - gib_to_bytes(11.5)  # what the resident leaves
    assert err.budget_bytes == BUDGET
    assert err.shortfall_bytes == gib_to_bytes(6.5)
    msg = str(err)
    assert "'sdxl-base'" in msg
    assert "10.50 GiB" in msg and "15.50 GiB" in msg and "short 6.50 GiB" in msg
    assert "qwen-14b (11.50 GiB)" in msg  # the ledger's description says who holds what


def test_begin_switch_not_fitting_because_of_a_resident_advises_unloading() -> None:
    planned = Ledger(BUDGET, residents=(QWEN,)).begin_load(SDXL)
    with pytest.raises(InsufficientVRAM) as info:
        ModelMachine().fire("begin_switch", planned)
    msg = str(info.value)
    assert "smaller variant" not in msg
    assert "unload a model or wait" in msg


def test_begin_switch_blocked_by_foreign_memory() -> None:
    m = ModelMachine()
    planned = Ledger(BUDGET, foreign_bytes=gib_to_bytes(6)).begin_load(QWEN)
    with pytest.raises(InsufficientVRAM) as info:
        m.fire("begin_switch", planned)
    assert m.state is State.IDLE
    assert info.value.free_bytes == gib_to_bytes(9.5)
    assert "foreign processes 6.00 GiB" in str(info.value)


def test_begin_switch_that_loads_nothing_is_allowed_over_the_budget() -> None:
    """An eviction-only switch frees memory: it is how the orchestrator gets back under a
    budget that foreign memory shrank, so the guard lets it through."""
    m = ModelMachine()
    over = Ledger(BUDGET, residents=(QWEN,), foreign_bytes=gib_to_bytes(5))
    assert not over.fits() and over.loading is None
    assert m.fire("begin_switch", over) is State.SWITCHING
    assert m.fire("finish_switch", over.move("qwen-14b", Tier.DISK)) is State.IDLE


def test_begin_switch_exactly_at_the_budget_fits() -> None:
    full = Ledger(gib_to_bytes(15)).begin_load(QWEN).finish_load().begin_load(SOVITS)
    assert full.committed_bytes == full.available_bytes
    assert ModelMachine().fire("begin_switch", full) is State.SWITCHING


# -- active_state ----------------------------------------------------------------------------


def _ledger(*residents: Resident) -> Ledger:
    return Ledger(BUDGET, residents=residents)


def test_active_state_nothing_is_idle() -> None:
    assert active_state(Ledger(BUDGET)) is State.IDLE


@pytest.mark.parametrize(("heavy", "state"), [(QWEN, State.LLM_ACTIVE), (SDXL, State.SDXL_ACTIVE)])
@pytest.mark.parametrize("light_more_recent", [False, True])
def test_heavy_resident_wins_over_light_rider(heavy: Resident, state: State, light_more_recent: bool) -> None:
    h, lt = (1, 2) if light_more_recent else (2, 1)
    ledger = _ledger(replace(heavy, last_used=h), replace(SOVITS, last_used=lt))
    assert active_state(ledger) is state


def test_light_alone_is_tts_active() -> None:
    assert active_state(_ledger(SOVITS)) is State.TTS_ACTIVE
    two = _ledger(SOVITS, Resident("kokoro", "tts", gib_to_bytes(1), last_used=5))
    assert active_state(two) is State.TTS_ACTIVE


def test_host_tier_residents_do_not_count() -> None:
    qwen_on_host = Resident("qwen-14b", "llm", QWEN.vram_bytes, tier=Tier.HOST, exclusive=True)
    assert active_state(_ledger(qwen_on_host)) is State.IDLE
    assert active_state(_ledger(qwen_on_host, SOVITS)) is State.TTS_ACTIVE
    sdxl_on_host = Resident("sdxl-base", "sdxl", SDXL.vram_bytes, tier=Tier.HOST, exclusive=True)
    assert active_state(_ledger(sdxl_on_host, QWEN)) is State.LLM_ACTIVE


def test_a_load_in_progress_does_not_count() -> None:
    assert active_state(Ledger(BUDGET).begin_load(QWEN)) is State.IDLE
    assert active_state(_ledger(SOVITS).begin_load(QWEN)) is State.TTS_ACTIVE


# -- purity ----------------------------------------------------------------------------------


def test_import_states_pulls_no_io_modules() -> None:
    code = (
        "import sys\n"
        "import states\n"
        "bad = sorted(m for m in sys.modules\n"
        "             if m.split('.')[0] in {'anyio', 'httpx', 'torch', 'yaml', 'orchestrator'})\n"
        "print(','.join(bad))\n"
    )
    root = Path(__file__).resolve().parents[2]
    path = [str(root), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"import states pulled in: {result.stdout.strip()}"
