"""The state machine: which state the GPU is in and which moves are legal.

Rule 1: every change of state goes through ``ModelMachine.fire`` and the ``TRANSITIONS``
table below; nothing assigns ``state`` by hand. Rule 2: guards are pure functions of the
ledger passed with the trigger; they never do IO. Rule 3: an illegal trigger raises
``IllegalTransition`` and changes nothing (``ignore_invalid_triggers`` stays off).

Which ACTIVE state is reported: a kind's ACTIVE state means a model of that kind is the
*primary* resident. When an exclusive ("heavy") model is on the GPU it is the primary, and a
light model riding along with it (TTS beside an LLM) does not change the state: the machine
reports LLM_ACTIVE. TTS_ACTIVE is reported only when light models alone are resident (the
most recently used one names the state). IDLE means nothing is on the GPU. A reservation for
an external program (a remote lease of raw bytes) counts against the budget but names no state.
"""

from __future__ import annotations

import enum
from typing import Any

from transitions import EventData, Machine, MachineError

from states.errors import IllegalTransition, InsufficientVRAM
from states.ledger import Ledger, Resident


class State(enum.Enum):
    IDLE = "idle"  # nothing of ours on the GPU
    LLM_ACTIVE = "llm"  # an LLM is the primary resident and can serve
    SDXL_ACTIVE = "sdxl"  # an SDXL pipeline is the primary resident and can serve
    TTS_ACTIVE = "tts"  # only light (TTS) models are resident
    SWITCHING = "switching"  # evicting/loading; no new leases are granted


KIND_STATES: dict[str, State] = {
    "llm": State.LLM_ACTIVE,
    "sdxl": State.SDXL_ACTIVE,
    "tts": State.TTS_ACTIVE,
}
STABLE = [State.IDLE, State.LLM_ACTIVE, State.SDXL_ACTIVE, State.TTS_ACTIVE]


def primary_resident(ledger: Ledger) -> Resident | None:
    """The resident that names the state (see the module docstring)."""
    gpu = [r for r in ledger.gpu_residents if not r.external]  # a reservation names no state
    heavy = [r for r in gpu if r.exclusive]
    pool = heavy or list(gpu)
    if not pool:
        return None
    return max(pool, key=lambda r: r.last_used)


def active_state(ledger: Ledger) -> State:
    """The stable state that matches what the ledger says is on the GPU."""
    primary = primary_resident(ledger)
    if primary is None:
        return State.IDLE
    return KIND_STATES[primary.kind]


# Where a switch (or a settle after a crash) lands is decided by what is resident: one row
# per destination, each guarded by "the primary resident is of this kind". transitions tries
# the rows of a trigger in order and takes the first whose guard passes.
_LAND = [
    (State.LLM_ACTIVE, "lands_llm"),
    (State.SDXL_ACTIVE, "lands_sdxl"),
    (State.TTS_ACTIVE, "lands_tts"),
    (State.IDLE, "lands_idle"),
]

TRANSITIONS: list[dict[str, Any]] = [
    # trigger          source           dest             guard (pure, reads the ledger)
    {"trigger": "begin_switch", "source": STABLE, "dest": State.SWITCHING, "conditions": "plan_fits_budget"},
    *({"trigger": "finish_switch", "source": State.SWITCHING, "dest": d, "conditions": g} for d, g in _LAND),
    *({"trigger": "fail_switch", "source": State.SWITCHING, "dest": d, "conditions": g} for d, g in _LAND),
    # A resident vanished outside a switch (a server crashed): land where the ledger says.
    *({"trigger": "settle", "source": STABLE, "dest": d, "conditions": g} for d, g in _LAND),
]

TRIGGERS = ("begin_switch", "finish_switch", "fail_switch", "settle")


class ModelMachine:
    """The GPU's state, moved only through ``TRANSITIONS``.

    Every trigger takes the ledger that holds after it (for ``begin_switch``: the planned
    ledger, with the load's bytes committed).
    """

    # Invariants:
    # - ``state`` is SWITCHING exactly between a begin_switch and its finish/fail_switch;
    # - outside SWITCHING, ``state == active_state(ledger)`` for the last ledger fired with.
    state: State

    def __init__(self) -> None:
        self._machine = Machine(
            model=self,
            states=State,
            transitions=TRANSITIONS,
            initial=State.IDLE,
            auto_transitions=False,
            send_event=True,
            ignore_invalid_triggers=False,
        )

    def fire(self, trigger: str, ledger: Ledger) -> State:
        """Fire ``trigger`` with ``ledger``; return the new state.

        :raises IllegalTransition: the table has no row for ``trigger`` in this state
            (the state is unchanged).
        :raises InsufficientVRAM: ``begin_switch`` with a ledger that does not fit.
        """
        if trigger not in TRIGGERS:
            raise IllegalTransition(trigger, self.state.name)
        before = self.state
        try:
            moved = self._machine.events[trigger].trigger(self, ledger=ledger)
        except MachineError:
            raise IllegalTransition(trigger, before.name) from None
        if not moved:
            if trigger == "begin_switch":
                loading = ledger.loading
                raise InsufficientVRAM(
                    loading.model if loading is not None else "(nothing)",
                    loading.vram_bytes if loading is not None else 0,
                    max(0, ledger.available_bytes - ledger.resident_bytes),
                    ledger.budget_bytes,
                    reason=f"the plan commits more than the room there is ({ledger.describe()})",
                )
            raise IllegalTransition(trigger, before.name)  # pragma: no cover - guards are exhaustive
        return self.state

    # -- guards: pure functions of the ledger ----------------------------------------------

    @staticmethod
    def _ledger(event: EventData) -> Ledger:
        ledger = event.kwargs.get("ledger")
        if not isinstance(ledger, Ledger):
            raise TypeError("every trigger needs ledger=<Ledger>")
        return ledger

    def plan_fits_budget(self, event: EventData) -> bool:
        # A switch that loads nothing only frees memory: it is always allowed (it is how the
        # orchestrator gets back under the budget when foreign memory grows).
        ledger = self._ledger(event)
        return ledger.fits() or ledger.loading is None

    def lands_llm(self, event: EventData) -> bool:
        return active_state(self._ledger(event)) is State.LLM_ACTIVE

    def lands_sdxl(self, event: EventData) -> bool:
        return active_state(self._ledger(event)) is State.SDXL_ACTIVE

    def lands_tts(self, event: EventData) -> bool:
        return active_state(self._ledger(event)) is State.TTS_ACTIVE

    def lands_idle(self, event: EventData) -> bool:
        return active_state(self._ledger(event)) is State.IDLE
