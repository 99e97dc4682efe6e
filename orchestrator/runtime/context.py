"""The runtime's shared books: the one ledger, the machine, the clock and the events.

Every part of the runtime (the lease book, the scheduler, the executor, accounting, crash
watching) works on one ``Context``. It holds the truth and the few helpers that keep it
consistent when it changes (an event per change, the machine moved only through its table);
it decides nothing and does no IO.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from typing import Any

import anyio

from orchestrator.backends.base import Backend
from orchestrator.config import Config, ModelSpec
from orchestrator.events import Event, EventHub
from orchestrator.footprints import FootprintStore
from orchestrator.runtime.lease import ExternalReservation
from orchestrator.runtime.stats import Counters
from states.cards import Card, Cards
from states.ledger import Ledger
from states.machine import ModelMachine, State, active_state
from states.plan import Policy, SwitchCosts
from states.step import backoff_s

logger = logging.getLogger("orchestrator")

COST_SMOOTHING = 0.3  # how far one new measurement moves a learned switch cost
COST_NAMES = tuple(f.name for f in fields(SwitchCosts))


class Context:
    """The ledger, the machine, the per-model bookkeeping and the event stream."""

    def __init__(
        self,
        config: Config,
        backends: dict[str, Backend],
        hub: EventHub,
        clock: Callable[[], float],
        store: FootprintStore | None = None,
    ) -> None:
        self.config = config
        self.backends = backends
        self.hub = hub
        self.clock = clock
        self.t0 = clock()
        self.policy = Policy(exclusive_kinds=config.exclusive_kinds)
        # leases at once per model (models.<name>.max_concurrent); a model not listed: no limit
        self.capacity: dict[str, int] = {
            name: spec.max_concurrent
            for name, spec in config.models.items()
            if spec.max_concurrent is not None
        }
        self.stats = Counters()

        # Invariants (checked by tests/orchestrator/test_properties.py after every step):
        # - on every card, committed_bytes <= its budget; a load begins only when plan.after fits;
        # - each card's machine.state == active_state(its ledger) unless a switch runs there;
        # - the cards and machines change only in the scheduler's step and the executor (and
        #   at a crash, where the ledger is made true at once).
        self.cards = Cards.of(
            [(Card(c.index, c.name), c.budget_bytes) for c in config.cards], config.host_budget_bytes
        )
        self.machines: dict[int, ModelMachine] = {c.index: ModelMachine() for c in config.cards}
        self.card_used_s: dict[int, float] = {}  # when each card last granted a lease
        self.lost_gpu_s: dict[str, float] = {}  # when each model last left the GPU
        self.failures: dict[str, int] = {}  # failures in a row
        self.backoff_until: dict[str, float] = {}
        self.last_error: dict[str, BaseException] = {}
        # residents to unload once idle (no new leases meanwhile), and why: a reload at a
        # learned size, unload() asked for it, a reservation that ended during a switch
        self.to_unload: dict[str, str] = {}
        self.externals: dict[str, ExternalReservation] = {}  # held or waited for
        # What the scheduler learns of each model's times is kept in the footprint store
        # (``store``), so that a restarted orchestrator starts from it; ``on_learned`` is
        # called when a switch cost was learned (the store's writer persists it).
        self.store = store
        self.on_learned: Callable[[], None] = lambda: None
        self.costs: dict[str, SwitchCosts] = {
            name: _first_costs(spec, config, self.stored_times(name)) for name, spec in config.models.items()
        }
        self._wake: anyio.Event | None = None  # made by the scheduler's loop (next_wake)
        self._measured: dict[str, set[str]] = {}  # which costs are measured, not estimated
        self._origin: dict[tuple[str, str], str] = {}  # where each learned cost's last load came from

    # -- the cards ---------------------------------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        """The machine's ledger as one (with one card: that card's own ledger)."""
        return self.cards.summary()

    @property
    def machine(self) -> ModelMachine:
        """The first card's machine (with one card: the machine)."""
        return self.machines[self.cards.indexes[0]]

    @property
    def several(self) -> bool:
        return len(self.cards) > 1

    def first_gpu(self) -> int:
        return self.cards.indexes[0]

    def home(self, model: str) -> tuple[int, ...]:
        """The cards ``model``'s backend was last bound to (what it may still hold is there);
        never loaded: the first card its config allows."""
        backend = self.backends.get(model)
        if backend is not None and backend.gpus:
            return backend.gpus
        spec = self.config.models.get(model)
        return (spec.gpus[0],) if spec is not None and spec.gpus else (self.first_gpu(),)

    def gpus_of(self, model: str) -> tuple[int, ...]:
        """The cards that hold ``model`` now, else the cards its backend last used."""
        return self.cards.gpus_of(model) or self.home(model)

    def switching_on(self, gpus: tuple[int, ...]) -> bool:
        return any(self.machines[g].state is State.SWITCHING for g in gpus)

    # -- time and wake-ups -------------------------------------------------------------------

    def now_s(self) -> float:
        return self.clock() - self.t0

    def wake(self) -> None:
        """Something changed that may change a decision: the scheduler steps again."""
        if self._wake is not None:
            self._wake.set()

    def next_wake(self) -> anyio.Event:
        """A fresh wake-up for the scheduler's next sleep."""
        self._wake = anyio.Event()
        return self._wake

    # -- changes that are events -------------------------------------------------------------

    def emit(self, kind: str, gpu: int | None = None, **kw: Any) -> None:
        """One event. Every event carries the committed bytes and the budget as they are now
        (of its card, on a machine with several: ``gpu``, else of the model's first card): the
        budget invariant can be checked from the event stream alone."""
        cards = self.cards
        stats = self.stats
        if len(cards) == 1:
            led = cards.ledgers[0]
        else:
            model = kw.get("model")
            if gpu is None:
                gpu = self.gpus_of(model)[0] if isinstance(model, str) else cards.indexes[0]
            led = cards.ledger(gpu)
            kw["gpu"] = gpu
        stats.peak_committed_bytes = max(stats.peak_committed_bytes, cards.committed_bytes)
        kw.setdefault("committed_bytes", led.committed_bytes)
        kw.setdefault("budget_bytes", led.budget_bytes)
        self.hub.emit(Event(time_s=self.now_s(), kind=kind, **kw))

    def fire(
        self,
        trigger: str,
        ledger: Ledger | None = None,
        *,
        model: str | None,
        gpu: int | None = None,
        t0: float | None = None,
        detail: str | None = None,
    ) -> None:
        """Move card ``gpu``'s machine (the first card's by default) through its table, with
        the ledger that holds after it (by default the card's ledger as it is now)."""
        gpu = self.first_gpu() if gpu is None else gpu
        machine = self.machines[gpu]
        now = self.cards.ledger(gpu)
        after = now if ledger is None else ledger
        before_state = machine.state
        machine.fire(trigger, after)
        self.emit(
            "transition",
            gpu=gpu,
            model=model,
            trigger=trigger,
            from_state=before_state.name,
            to_state=machine.state.name,
            bytes_before=now.committed_bytes,
            bytes_after=after.committed_bytes,
            duration_s=None if t0 is None else self.now_s() - t0,
            detail=detail,
        )

    def settle_cards(self) -> None:
        """A card that is not switching and whose ledger changed under it (a model spanning
        it was evicted through another of its cards) lands where its ledger says."""
        if not self.several:
            return
        for gpu, machine in self.machines.items():
            landed = active_state(self.cards.ledger(gpu))
            if machine.state is not State.SWITCHING and machine.state is not landed:
                self.fire("settle", model=None, gpu=gpu, detail="a model spanning this card left it")

    @property
    def switching(self) -> bool:
        """A switch runs on some card."""
        return any(m.state is State.SWITCHING for m in self.machines.values())

    # -- per-model health --------------------------------------------------------------------

    def note_lost(self, model: str) -> None:
        self.lost_gpu_s[model] = self.now_s()

    def back_off(self, model: str, exc: BaseException) -> tuple[int, float]:
        """Count a failure in a row, record it, and hold the model back (``backoff_s``)."""
        n = self.failures.get(model, 0) + 1
        self.failures[model] = n
        self.last_error[model] = exc
        backoff = backoff_s(n, self.config.retry_backoff_s, self.config.max_wait_s)
        self.backoff_until[model] = self.now_s() + backoff
        return n, backoff

    def learn_cost(self, model: str, what: str, seconds: float, *, origin: str | None = None) -> None:
        """A load ("load_s"), restore ("restore_s"), unload ("unload_s") or offload to its host
        copy ("offload_s") of ``model`` took ``seconds``: the estimate moves toward it (the
        decision weighs switches by these).

        ``origin`` says where a load came from ("source", "cache": the packed disk cache):
        a load from elsewhere than the last one replaces the estimate instead of moving it
        (the first load from the source writes the cache, and every later cold load is the
        cache's: what the next switch costs is the new figure, not a blend of the two)."""
        old = self.costs.get(model)
        if old is None:
            return  # a reservation: nothing to learn
        now = getattr(old, what)
        moved = origin is not None and self._origin.get((model, what), origin) != origin
        if origin is not None:
            self._origin[(model, what)] = origin
        blended = (
            seconds
            if model not in self._measured.get(what, set()) or moved
            else now + COST_SMOOTHING * (seconds - now)
        )
        self._measured.setdefault(what, set()).add(model)
        self.costs[model] = replace(old, **{what: blended})
        self.keep_time(model, what, blended)
        self.on_learned()

    def stored_times(self, model: str) -> dict[str, float]:
        """What an earlier run learned of ``model``'s times, in this run's seconds."""
        if not self._keeps_times(model):
            return {}
        assert self.store is not None
        scale = self._scale(model)
        return {what: seconds * scale for what, seconds in self.store.times(model).items()}

    def keep_time(self, model: str, what: str, seconds: float) -> None:
        """Note a learned time of ``model`` in the store (persisted with its next write). A
        simulated model's times are kept at time scale 1, so that a run at another scale
        reads them right."""
        if not self._keeps_times(model) or not math.isfinite(seconds):
            return
        assert self.store is not None
        self.store.note_time(model, what, max(0.0, seconds) / self._scale(model))

    def _keeps_times(self, model: str) -> bool:
        """Times are kept with the footprints, and like them only when the config learns."""
        return self.store is not None and self.config.learn_footprints and model in self.config.models

    def _scale(self, model: str) -> float:
        return self.config.time_scale if self.config.models[model].backend == "simulated" else 1.0

    def succeeded(self, model: str) -> None:
        """A switch to ``model`` worked: its failures in a row and its back-off are over."""
        self.failures.pop(model, None)
        self.last_error.pop(model, None)
        self.backoff_until.pop(model, None)


def _first_costs(spec: ModelSpec, config: Config, stored: Mapping[str, float]) -> SwitchCosts:
    """A model's switch costs before any is measured in this run: what an earlier run learned
    (``stored``), else a simulated model's configured latencies, else the defaults
    (``SwitchCosts``); each is replaced by the first measurement."""
    if spec.sim is None:
        first = SwitchCosts()
    else:
        scale = config.time_scale
        first = SwitchCosts(
            load_s=spec.sim.load_s * scale,
            restore_s=(spec.sim.restore_s if spec.offload else spec.sim.load_s) * scale,
            unload_s=spec.sim.unload_s * scale,
            offload_s=spec.sim.offload_s * scale,
        )
    return replace(first, **{k: v for k, v in stored.items() if k in COST_NAMES})
