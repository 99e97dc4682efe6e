"""The ``Orchestrator`` facade: construction, lifecycle, acquire/reserve/unload, the read API.

How a request flows (see docs/architecture.md): ``acquire()`` queues a waiter in the lease
book (``queue.py``) and waits. The scheduler (``scheduler.py``) takes a snapshot, asks the
pure ``states.step.decide`` what to do, applies its grants and failures, and runs its one
action through the executor (``executor.py``: one unload path, one load path). Accounting
(``accounting.py``) reads the device and learns footprints; crash watching (``watch.py``)
makes the ledger true when a model's process dies. This class only wires them together.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Hashable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from orchestrator.backends.base import Backend
from orchestrator.backends.children import orphan_records, reap_orphans
from orchestrator.backends.registry import create_backend
from orchestrator.config import Config, ModelSpec, load_config
from orchestrator.device import DeviceUnavailable, open_device
from orchestrator.device.base import Device
from orchestrator.device.simulated import SimulatedDevice
from orchestrator.errors import AcquireTimeout, ConfigError, InsufficientVRAM, NotRunning, UnknownModel
from orchestrator.events import Event, EventHub
from orchestrator.footprints import FootprintStore, default_path
from orchestrator.monitor import ModelEstimate, PeakSampler, VRAMMonitor, open_store
from orchestrator.runtime.accounting import Accounting
from orchestrator.runtime.context import Context
from orchestrator.runtime.executor import Executor
from orchestrator.runtime.externals import Externals
from orchestrator.runtime.lease import EXTERNAL_KIND, ExternalReservation, Lease
from orchestrator.runtime.outcomes import ShutdownReport
from orchestrator.runtime.queue import LeaseBook
from orchestrator.runtime.scheduler import Scheduler
from orchestrator.runtime.stats import Statistics
from orchestrator.runtime.unloading import RELEASE_POLL_S
from orchestrator.runtime.watch import CrashWatch
from orchestrator.spec import CardSpec
from states.cards import Cards
from states.ledger import Ledger
from states.machine import State
from states.plan import Policy, SwitchCosts


class Orchestrator:
    """Hands tasks ready models and keeps the GPU within its budget.

    Use it as an async context manager; ``acquire()`` works only inside it::

        async with Orchestrator.from_config() as orch:     # the embedded default config
            async with orch.acquire("sdxl") as lease:
                image = lease.handle(...)
    """

    def __init__(
        self,
        config: Config,
        *,
        device: Device | None = None,
        devices: Mapping[int, Device] | None = None,
        backends: Mapping[str, Backend] | None = None,
        footprints: FootprintStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        first = config.cards[0].index
        if devices is not None:
            missing = [c.index for c in config.cards if c.index not in devices]
            if missing:
                raise ValueError(f"devices= has no device for the config's cards {missing}")
            self.devices: dict[int, Device] = {c.index: devices[c.index] for c in config.cards}
        elif device is not None:
            if len(config.cards) > 1:
                raise ValueError("the config has several cards: pass devices= with one device per card")
            self.devices = {first: device}
        else:
            self.devices = {c.index: _make_device(config, c) for c in config.cards}
            for d in self.devices.values():
                if isinstance(d, SimulatedDevice):
                    d.clock = clock  # its slow releases run on the orchestrator's clock
        self.device: Device = self.devices[first]  # the first card (with one card: the card)
        self.backends: dict[str, Backend] = dict(backends or {})
        for name, spec in config.models.items():
            if name not in self.backends:
                self.backends[name] = self._make_backend(spec)
        self.hub = EventHub()
        self.footprints = footprints if footprints is not None else open_store(config)
        self.monitor = VRAMMonitor(self.device, config, footprints=self.footprints, clock=clock)
        self.sampler = PeakSampler(self.device, config.sample_hz, clock=clock)

        ctx = self._ctx = Context(config, self.backends, self.hub, clock, self.footprints)
        self._accounting = Accounting(ctx, self.devices, self.footprints)
        self._book = LeaseBook(
            ctx, on_release=self._accounting.note_use_peak, holding_text=self._holding_text
        )
        self._watch = CrashWatch(ctx, self._book)
        self._executor = Executor(ctx, self._book, self._accounting, self._watch)
        self._externals = Externals(ctx, self.devices)
        self._scheduler = Scheduler(ctx, self._book, self._accounting, self._executor, self._externals)
        self._tg: TaskGroup | None = None
        self._running = False
        self._closing = False
        self._on_close: list[Callable[[], None]] = []
        self.shutdown_report: ShutdownReport | None = None  # what the last shutdown really did

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_config(cls, path: str | Path | None = None, **kwargs: Any) -> Orchestrator:
        """Build from a YAML file (``None``: the embedded default, the simulated 16 GiB GPU)."""
        return cls(load_config(path), **kwargs)

    def _make_backend(self, spec: ModelSpec) -> Backend:
        log_dir = default_path().parent / "logs"
        first = spec.gpus[0] if spec.gpus else self.config.cards[0].index
        return create_backend(spec, config=self.config, device=self.devices[first], log_dir=log_dir)

    # -- reading -----------------------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        return self._ctx.policy

    @property
    def state(self) -> State:
        return self._ctx.machine.state

    def ledger(self) -> Ledger:
        """A frozen snapshot of the ledger (with several cards: the machine's totals as one
        ledger; ``cards()`` has each card's own)."""
        return self._ctx.ledger

    def cards(self) -> Cards:
        """A frozen snapshot of every card's ledger (one card: a ``Cards`` of one)."""
        return self._ctx.cards

    def costs(self) -> dict[str, SwitchCosts]:
        """What a switch of each model costs (load, restore, unload seconds): learned from its
        last switches, estimated until then."""
        return dict(self._ctx.costs)

    def states(self) -> dict[int, State]:
        """Each card's state, by card index."""
        return {g: m.state for g, m in self._ctx.machines.items()}

    def now_s(self) -> float:
        return self._ctx.now_s()

    def backend(self, name_or_kind: str) -> Backend:
        return self.backends[self.resolve(name_or_kind).name]

    def resolve(self, name_or_kind: str) -> ModelSpec:
        spec = self.config.resolve(name_or_kind)
        if spec is None:
            raise UnknownModel(name_or_kind, list(self.config.models), list(self.config.defaults))
        return spec

    def statistics(self) -> Statistics:
        return self._ctx.stats.snapshot(self.state, self._book.active(), self._book.waiting_counts())

    @property
    def running(self) -> bool:
        """Inside ``async with orch`` (and not shutting down)."""
        return self._running and not self._closing

    def leases(self) -> Mapping[str, int]:
        """Active leases per model (a copy: safe to call from another thread)."""
        return self._book.active()

    def waiting(self) -> list[tuple[str, int, float]]:
        """The queue: (model, priority, seconds waited), in arrival order (a copy)."""
        now = self.now_s()
        return [(w.model, w.priority, now - w.arrived_s) for w in list(self._book.waiters)]

    def deferred(self) -> Mapping[str, str]:
        """Models whose waiters wait for room that foreign processes hold, and why (a copy)."""
        return {m: d.reason for m, d in self._scheduler.deferred.items()}

    def last_errors(self) -> Mapping[str, BaseException]:
        """The error of each model whose last switch failed (cleared by its next success)."""
        return dict(self._ctx.last_error)

    def estimate(self, name_or_kind: str) -> ModelEstimate:
        """What the orchestrator plans with for a model: configured, or learned when larger."""
        return self._accounting.estimate(self.resolve(name_or_kind).name)

    def accounted_bytes(self, gpu: int | None = None) -> int:
        """What our GPU residents hold on card ``gpu`` (the first by default): measured where
        the backend can tell, else planned (a model spanning cards: its planned share)."""
        return self._accounting.accounted_bytes(gpu)

    def external_reservations(self) -> list[ExternalReservation]:
        """The reservations for external programs, held or waited for (a copy)."""
        return list(self._ctx.externals.values())

    def check_external_usage(self) -> list[tuple[ExternalReservation, int]]:
        """(reservation, bytes its program uses now) for each held reservation with a pid."""
        return self._externals.check_usage()

    def add_listener(self, fn: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``fn(event)`` for every event; returns a function that unsubscribes."""
        return self.hub.add_listener(fn)

    def events(self, buffer: int = 1000) -> AsyncIterator[Event]:
        """Async iterator over events from now on (drops events when ``buffer`` is full)."""
        return self.hub.subscribe(buffer)

    def emit_event(self, kind: str, *, model: str | None = None, detail: str | None = None) -> None:
        """Add an event of the caller's (the daemon's lease expiry, for one) to the stream."""
        self._ctx.emit(kind, model=model, detail=detail)

    def _holding_text(self, model: str) -> str:
        text = self._ctx.ledger.describe()
        deferred = self._scheduler.deferred.get(model)
        if deferred is not None:
            text += f"; {deferred.reason}{self._accounting.foreign_text()}"
        return text

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Orchestrator:
        if self._running:
            raise RuntimeError("this orchestrator is already running")
        if orphan_records():  # servers a SIGKILLed orchestrator left: stopping them waits a grace
            await anyio.to_thread.run_sync(reap_orphans)
        self._closing = False
        if self.config.events_path:
            self._open_event_log(self.config.events_path)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = self._watch.tg = tg
        self._running = True
        tg.start_soon(self._scheduler.run, name="vram-orchestrator scheduler")
        tg.start_soon(self._accounting.run_writer, name="vram-orchestrator footprint writer")
        if self.config.sample_hz > 0:
            tg.start_soon(self.sampler.run, name="vram-orchestrator peak sampler")
        for b in self.backends.values():  # demand from programs that never call us (most return at once)
            tg.start_soon(b.watch_demand, self.acquire, name=f"vram-orchestrator demand of {b.name}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _open_event_log(self, name: str) -> None:
        """Append every event to ``name`` as a JSON line, until the orchestrator stops."""
        path = Path(name).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = path.open("a", buffering=1)
        except OSError as exc:
            raise ConfigError(
                self.config.source,
                "observability.events_path",
                f"cannot write {path} ({exc.strerror})",
                "choose a writable path",
            ) from None

        def write(e: Event) -> None:
            f.write(json.dumps(e.to_dict()) + "\n")

        remove = self.hub.add_listener(write)

        def close() -> None:
            remove()
            f.close()

        self._on_close.append(close)

    async def aclose(self) -> None:
        """Stop scheduling, fail the waiters, unload everything. Safe to call twice."""
        if not self._running or self._tg is None:
            return
        self._closing = True
        self._book.fail_all(NotRunning())
        tg, self._tg = self._tg, None
        self._watch.tg = None
        tg.cancel_scope.cancel()
        try:
            await tg.__aexit__(None, None, None)
        finally:
            self._running = False
            try:
                with anyio.CancelScope(shield=True):
                    self.shutdown_report = await self._executor.shutdown()
                    await self._accounting.flush()
            finally:
                for fn in self._on_close:
                    fn()
                self._on_close.clear()

    # -- acquire, reserve, unload ------------------------------------------------------------

    @asynccontextmanager
    async def acquire(
        self,
        name_or_kind: str,
        *,
        timeout: float | None = None,
        priority: int = 0,
        owner: Hashable | None = None,
    ) -> AsyncIterator[Lease]:
        """Wait for ``name_or_kind`` to be resident and hold it for the block.

        A kind ("sdxl") means the config's default model of that kind. Several leases on one
        model run concurrently. Higher ``priority`` is served first. ``owner`` names who holds
        the lease for deadlock detection (default: the current task).

        :raises UnknownModel: the name is neither a model nor a kind with a default.
        :raises InsufficientVRAM: the model can never fit the budget.
        :raises AcquireTimeout: not granted within ``timeout`` seconds.
        :raises LeaseDeadlock: this task holds a lease on a model that must be evicted first.
        :raises LoadFailed, UnloadFailed, BackendOutOfMemory, VRAMNotReleased: the switch failed.
        :raises NotRunning: outside ``async with orch``, or the orchestrator is shutting down.
        """
        spec = self.resolve(name_or_kind)
        if not self.running:
            raise NotRunning()
        if spec.vram_bytes > self.config.budget_bytes:
            raise InsufficientVRAM(
                spec.name, spec.vram_bytes, self.config.budget_bytes, self.config.budget_bytes
            )
        _check_timeout(timeout)
        async with self._book.hold(spec.name, spec.kind, timeout, priority, owner) as lease:
            yield lease

    @asynccontextmanager
    async def reserve(
        self,
        n_bytes: int,
        *,
        timeout: float | None = None,
        priority: int = 0,
        pid: int | None = None,
        holder: str = "",
        owner: Hashable | None = None,
    ) -> AsyncIterator[Lease]:
        """Reserve ``n_bytes`` of VRAM for a program outside the orchestrator, for the block.

        The reservation waits in the queue like any acquire; the scheduler makes room for it
        by evicting our models (idle ones at once, busy ones after the fairness bound), and
        the ledger counts it like a resident until the block ends. The lease's ``model`` is
        the reservation's id and its ``handle`` the ``ExternalReservation``. With ``pid``,
        that program's real use is checked against ``n_bytes`` (``check_external_usage``).

        :raises ValueError: ``n_bytes`` is not a positive integer, or ``pid`` not a pid.
        :raises InsufficientVRAM: ``n_bytes`` is larger than the whole budget.
        :raises AcquireTimeout, NotRunning: as ``acquire()``.
        """
        if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes <= 0:
            raise ValueError(f"a reservation needs a positive number of bytes, got {n_bytes!r}")
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0):
            raise ValueError(f"pid must be a positive process id, got {pid!r}")
        if not self.running:
            raise NotRunning()
        if n_bytes > self.config.budget_bytes:
            raise InsufficientVRAM(
                "external reservation",
                n_bytes,
                self.config.budget_bytes,
                self.config.budget_bytes,
                advice="ask for less, or raise hardware.safe_max_vram_gb",
            )
        _check_timeout(timeout)
        reservation = self._externals.create(n_bytes, pid, holder)
        try:
            async with self._book.hold(reservation.id, EXTERNAL_KIND, timeout, priority, owner) as lease:
                yield lease
        finally:
            self._externals.end(reservation.id)

    async def unload(self, name_or_kind: str, *, timeout: float | None = None) -> None:
        """Unload a model (from the GPU and the host tier) as soon as its leases end; no new
        lease is granted on it meanwhile. Returns when its memory is back.

        :raises AcquireTimeout: the model's leases did not end within ``timeout``.
        """
        spec = self.resolve(name_or_kind)
        if not self.running:
            raise NotRunning()
        ctx = self._ctx
        if ctx.ledger.get(spec.name) is None:
            return
        ctx.to_unload[spec.name] = "unload requested"
        ctx.wake()
        try:
            with anyio.fail_after(timeout):
                while ctx.ledger.get(spec.name) is not None:  # noqa: ASYNC110 - the scheduler does it
                    await anyio.sleep(RELEASE_POLL_S)
        except TimeoutError:
            ctx.to_unload.pop(spec.name, None)
            raise AcquireTimeout(
                spec.name, timeout or 0.0, 0, sum(self.leases().values()), "its leases did not end"
            ) from None


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout}")


def _make_device(config: Config, card: CardSpec) -> Device:
    try:
        return open_device(config.device, card.index, total_bytes=card.total_bytes, name=card.name)
    except DeviceUnavailable as exc:
        raise ConfigError(
            config.source,
            "hardware.device",
            f"{config.device!r} cannot be used here: {exc}",
            "use `device: auto` (NVML, then torch, then the simulated device) or `device: simulated`",
        ) from None
