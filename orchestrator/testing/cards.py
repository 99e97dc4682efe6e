"""The property-test machine on several cards (the one-card machine with a simulated device
per card and every check per card): ``machine_for`` picks it for a config with several cards,
so ``vram-orchestrator check`` tests such a config too."""

from __future__ import annotations

import anyio
import hypothesis.strategies as st
from hypothesis.stateful import initialize, precondition, rule

from orchestrator.config import Config
from orchestrator.device.simulated import SimulatedDevice, SimulatedOOM
from orchestrator.events import Event
from orchestrator.runtime import Orchestrator
from orchestrator.testing.machine import InvariantViolation, OrchestratorMachine, left_on, scaled
from states.machine import State, active_state
from states.units import format_gib


class CardsMachine(OrchestratorMachine):
    """The machine on a config with several cards: a simulated device per card, and every
    check per card (see ``OrchestratorMachine`` for the rules)."""

    @initialize()
    def start(self) -> None:
        self.start_on(self.config)

    def start_on(self, config: Config) -> None:
        self.config = config
        self.cfg = scaled(self.config, self.time_scale, footprint_factor=self.footprint_factor)
        self.devices = {
            c.index: SimulatedDevice(c.total_bytes, name=f"card {c.index}") for c in self.cfg.cards
        }
        self.device = self.devices[0]
        self.spans = {m: s.tensor_parallel for m, s in self.cfg.models.items() if s.tensor_parallel > 1}
        self.orch = Orchestrator(self.cfg, devices=self.devices)
        self.orch.add_listener(self._on_event)
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self._orch_cm = self.portal.wrap_async_context_manager(self.orch)
        self._orch_cm.__enter__()
        self.foreign: list[tuple[int, int]] = []  # (card, pid)

    def teardown(self) -> None:
        if not hasattr(self, "portal"):
            return
        super().teardown()  # clients end, the orchestrator shuts down, the first card is checked
        left = {g: left_on(d, 2 * self.cfg.unload_timeout_s) for g, d in self.devices.items()}
        left = {g: h for g, h in left.items() if h}
        if left:
            raise InvariantViolation(f"memory left on the cards after shutdown: {left}")
        states = self.orch.states()
        if any(s is not State.IDLE for s in states.values()):
            raise InvariantViolation(f"states after shutdown: {states}")

    # -- the checks, per card ----------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        super()._on_event(event)
        cards = self.orch.cards()
        if event.gpu is not None:
            if (event.committed_bytes or 0) > (event.budget_bytes or 0):
                self.violations.append(f"event {event.kind} {event.model}: card {event.gpu} over budget")
            if event.kind == "transition" and event.trigger == "begin_switch" and event.model is not None:
                # A load begins only when its card's plan fits that card's room.
                ledger = cards.ledger(event.gpu)
                room = ledger.budget_bytes - ledger.foreign_bytes
                if (event.bytes_after or 0) > room:
                    self.violations.append(
                        f"{event.model} on card {event.gpu}: the plan commits "
                        f"{format_gib(event.bytes_after or 0)}, the room is {format_gib(room)}"
                    )
        for model, k in self.spans.items():
            on = cards.gpus_of(model)
            if len(on) not in (0, k):
                self.violations.append(f"at {event.kind}: {model} spans {k} cards but is on {on}")

    def _check_budget(self, where: str) -> None:
        cards = self.orch.cards()
        for card, ledger in cards:
            if ledger.committed_bytes > ledger.budget_bytes:
                self.violations.append(
                    f"{where}: {card.label} commits {format_gib(ledger.committed_bytes)} > "
                    f"its budget {format_gib(ledger.budget_bytes)}"
                )
            peak = self.devices[card.index].peak_owned_bytes
            if peak > ledger.budget_bytes:
                self.violations.append(
                    f"{where}: {card.label}'s device peak {format_gib(peak)} > "
                    f"{format_gib(ledger.budget_bytes)}"
                )

    async def _check_all(self) -> None:
        self._check_budget("after a step")
        states = self.orch.states()
        for card, ledger in self.orch.cards():
            state = states[card.index]
            if state is not State.SWITCHING and state is not active_state(ledger):
                self.violations.append(f"{card.label} is {state.name} but holds {ledger.describe()}")
        # As the base check: let the tasks run a little, then compare the shadow queue.
        for _ in range(50):
            shadow, real = self._accounting()
            if shadow == real:
                return
            await anyio.sleep(0.001)
        self.violations.append(f"the clients wait and hold {shadow}, the orchestrator has {real}")

    # -- foreign memory on any card --------------------------------------------------------------

    def foreign_process_takes_memory(self, gib: float) -> None:  # the base rule: replaced below
        pass

    def foreign_process_exits(self) -> None:
        pass

    @rule(data=st.data(), gib=st.floats(0.5, 6))
    @precondition(lambda self: len(getattr(self, "foreign", ())) < 2)
    def foreign_takes_memory_on_a_card(self, data: st.DataObject, gib: float) -> None:
        gpu = data.draw(st.sampled_from(sorted(self.devices)), label="card")
        pid = 10_000 + self.next_id + 100 * len(self.foreign)
        self.foreign.append((gpu, pid))
        device = self.devices[gpu]

        def take() -> None:
            try:
                device.take_foreign(pid, int(gib * 2**30))
            except SimulatedOOM:
                pass

        self.portal.call(self._run_sync, take)

    @rule()
    @precondition(lambda self: bool(getattr(self, "foreign", ())))
    def foreign_exits_on_a_card(self) -> None:
        gpu, pid = self.foreign.pop(0)
        device = self.devices[gpu]

        def release() -> None:
            device.release_foreign(pid)

        self.portal.call(self._run_sync, release)

    async def _release_foreign(self) -> None:
        for gpu, pid in self.foreign:
            self.devices[gpu].release_foreign(pid)
        self.foreign.clear()
