"""The hypothesis stateful test on several cards: random machines of 1-4 simulated cards of
different sizes, random acquires, cancellations, faults and foreign memory on each card.

After every step and at every event: no card's committed bytes pass its budget, and no card's
device ever held more than its budget; a spanning (tensor-parallel) model is resident on all
its cards or on none; each card's state matches what is resident on it outside a switch; no
lease or waiter is lost; every client finishes; nothing is left on any card at the end.
"""

from __future__ import annotations

import os

import anyio
import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import initialize, precondition, rule

from orchestrator import Orchestrator
from orchestrator.config import Config, parse_config
from orchestrator.device.simulated import SimulatedDevice, SimulatedOOM
from orchestrator.events import Event
from orchestrator.testing import InvariantViolation, OrchestratorMachine, scaled
from states.machine import State, active_state
from states.units import format_gib

SETTINGS = settings(
    max_examples=int(os.environ.get("PROPERTY_EXAMPLES", "25")),
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

CARD_SIZES_GIB = (16, 24, 20, 12)  # a card the largest model does not fit (12) is among them


def machine_config(sizes: list[int], restrict: bool, span: bool) -> Config:
    """Models of the Model Management Module's sizes on cards of ``sizes`` GiB; with
    ``restrict`` one model may use only the last card; with ``span`` an LLM spans two cards."""
    cards = ", ".join(
        f"{{index: {i}, total_vram_gb: {s}, safe_max_vram_gb: {s - 0.5}}}" for i, s in enumerate(sizes)
    )
    last = len(sizes) - 1
    sdxl_gpus = f", gpus: [{last}]" if restrict and sizes[last] >= 12 else ""
    tp = (
        "\n  llm-70b: {kind: llm, vram_gb: 20, tensor_parallel: 2}"
        if span and len(sizes) >= 2 and sorted(sizes)[-2] - 0.5 >= 10.5
        else ""
    )
    return parse_config(
        f"""
hardware: {{device: simulated, gpus: [{cards}]}}
switching: {{host_ram_budget_gb: 12, max_wait_s: 120, retry_backoff_s: 1.0}}
monitor: {{footprints_path: null}}
models:
  qwen-14b: {{kind: llm, vram_gb: 11.5}}
  qwen-vl-7b: {{kind: llm, vram_gb: 13.8}}
  sdxl-base: {{kind: sdxl, vram_gb: 10.5, offload: true, host_gb: 6.5{sdxl_gpus}}}
  sdxl-lora: {{kind: sdxl, vram_gb: 11.5, offload: true, host_gb: 6.7}}
  gpt-sovits-small: {{kind: tts, vram_gb: 3.5, offload: true, host_gb: 2.0}}{tp}
""",
        source="<property test: several cards>",
    )


class CardsMachine(OrchestratorMachine):
    config = machine_config([16, 24], False, False)  # replaced by each example's own

    @initialize(
        sizes=st.lists(st.sampled_from(CARD_SIZES_GIB), min_size=1, max_size=4).filter(
            lambda s: max(s) >= 16
        ),
        restrict=st.booleans(),
        span=st.booleans(),
    )
    def start(self, sizes: list[int], restrict: bool, span: bool) -> None:  # type: ignore[override]
        self.config = machine_config(sizes, restrict, span)
        self.cfg = scaled(self.config, self.time_scale)
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
        left = {
            g: {o: n for o, n in d.holders().items() if not o.startswith("foreign:")}
            for g, d in self.devices.items()
        }
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
        self.portal.call(self._run_sync, lambda: self.devices[gpu].release_foreign(pid))

    async def _release_foreign(self) -> None:
        for gpu, pid in self.foreign:
            self.devices[gpu].release_foreign(pid)
        self.foreign.clear()


TestSeveralCards = CardsMachine.TestCase
TestSeveralCards.settings = SETTINGS
