"""The Orchestrator: ``acquire()``, the scheduler and the executor.

One place decides, one place does, one ledger is the truth:

- ``acquire()`` only queues a waiter and waits; it never checks a state and acts on it.
- The scheduler task (``_schedule_loop``) is the only code that grants leases, chooses a
  target and starts a switch. It asks the pure ``states`` package what to do
  (``choose_target``, ``plan``, ``admission``) and runs one switch at a time under
  ``_switch_lock``.
- The executor (``_switch``) carries a plan out through the backends and updates the ledger
  *after* each step's IO succeeded; the machine moves only through its table
  (``begin_switch``, then ``finish_switch`` or ``fail_switch``). Cleanup after a failure or a
  cancellation is shielded and has a deadline, and the machine lands in the state that
  matches what is really resident.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from orchestrator.backends.base import Backend
from orchestrator.backends.registry import create_backend
from orchestrator.config import Config, ModelSpec, load_config
from orchestrator.device import DeviceUnavailable, open_device
from orchestrator.device.base import Device, DeviceOutOfMemory, DeviceReading
from orchestrator.errors import (
    AcquireTimeout,
    BackendCrashed,
    BackendError,
    BackendOutOfMemory,
    ConfigError,
    InsufficientVRAM,
    LeaseDeadlock,
    LeaseEnded,
    LoadFailed,
    NotRunning,
    UnknownModel,
    UnloadFailed,
    VRAMNotReleased,
)
from orchestrator.events import Event, EventHub
from orchestrator.footprints import FootprintStore, default_path
from orchestrator.monitor import (
    ModelEstimate,
    PeakSampler,
    VRAMMonitor,
    describe_processes,
    foreign_processes,
    open_store,
    planning_estimate,
    wait_released,
)
from states.ledger import Ledger, Resident, Tier
from states.machine import ModelMachine, State
from states.plan import Deferred, Plan, PlanRequest, Policy, plan
from states.scheduling import Mode, SchedulerView, WaiterView, admission, choose_target, rank_targets
from states.units import format_gib

logger = logging.getLogger("orchestrator")

RELEASE_POLL_S = 0.002  # how often the release wait reads the device
DEFERRED_POLL_S = 0.05  # how often a request blocked by foreign memory looks again
WAIT_SAMPLES = 10_000  # the latest waits kept for the percentiles in statistics()
EXTERNAL_KIND = "external"  # the kind of a reservation for a program outside the orchestrator


class _NoRoom(Exception):
    """The device lacks the room the ledger promised (foreign memory appeared)."""

    def __init__(self, error: InsufficientVRAM) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(eq=False)
class _Waiter:
    seq: int
    model: str
    priority: int
    arrived_s: float
    task_id: Hashable  # the task (or the remote holder) that waits: deadlock detection
    event: anyio.Event = field(default_factory=anyio.Event)
    granted: bool = False
    error: BaseException | None = None


class Lease:
    """A granted slot on a resident model. ``handle`` is the backend's live object.

    The lease lets go of the handle when its block ends: a lease object kept past its block
    (a variable, a list of results) must not keep a pipeline, and its GPU memory, alive after
    the model is evicted. ``handle`` then raises ``LeaseEnded``.
    """

    __slots__ = ("_handle", "ended", "kind", "model", "priority", "waited_s")

    def __init__(self, model: str, kind: str, handle: Any, waited_s: float, priority: int) -> None:
        self.model, self.kind, self.waited_s, self.priority = model, kind, waited_s, priority
        self._handle = handle
        self.ended = False

    @property
    def handle(self) -> Any:
        if self.ended:
            raise LeaseEnded(self.model)
        return self._handle

    def _end(self) -> None:
        self._handle = None
        self.ended = True

    def __repr__(self) -> str:
        state = "ended" if self.ended else "held"
        return f"Lease(model={self.model!r}, kind={self.kind!r}, {state}, waited_s={self.waited_s:.3f})"


@dataclass(frozen=True)
class ExternalReservation:
    """VRAM reserved for a program outside the orchestrator (``orch.reserve()``).

    It is in the ledger as a resident named ``id`` while its lease is held: the planner makes
    room for it by evicting our models, and the budget invariant covers it. ``pid``, when
    given, is the program whose real use on the device is checked against ``vram_bytes``.
    """

    id: str
    vram_bytes: int
    pid: int | None
    holder: str
    created_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "vram_bytes": self.vram_bytes,
            "pid": self.pid,
            "holder": self.holder,
            "created_s": self.created_s,
        }


class _ExternalBackend(Backend):
    """An external reservation's stand-in: loading it moves no bytes (the program allocates
    its own memory); what it really uses is checked by pid (``check_external_usage``)."""

    def __init__(self, reservation: ExternalReservation) -> None:
        super().__init__(reservation.id, EXTERNAL_KIND, reservation.vram_bytes)
        self.reservation = reservation

    async def load(self, limit_bytes: int | None = None) -> Any:
        self._tier = Tier.GPU
        self._handle = self.reservation
        return self.reservation

    async def unload(self) -> None:
        self._handle = None
        self._tier = Tier.DISK


@dataclass(frozen=True)
class WaitStats:
    """Lease waits: count, mean and max since the start; p50/p99 over the latest 10,000."""

    count: int
    mean_s: float
    p50_s: float
    p99_s: float
    max_s: float


@dataclass(frozen=True)
class Statistics:
    """Counters since the orchestrator started (``orch.statistics()``)."""

    state: State
    switches: int  # switches that completed
    failed_switches: int
    loads: int  # cold loads from disk
    restores: int  # restores from the host tier
    evictions: int
    grants: int
    releases: int
    timeouts: int
    cancellations: int
    active_leases: Mapping[str, int]
    waiting: Mapping[str, int]
    switching_s: float  # time spent inside switches
    waits: WaitStats
    peak_committed_bytes: int


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


class Orchestrator:
    """Hands tasks ready models and keeps the GPU within its budget.

    Use it as an async context manager; ``acquire()`` works only inside it::

        async with Orchestrator.from_config("configs/simulated-16gb.yaml") as orch:
            async with orch.acquire("sdxl") as lease:
                image = lease.handle(...)
    """

    def __init__(
        self,
        config: Config,
        *,
        device: Device | None = None,
        backends: Mapping[str, Backend] | None = None,
        footprints: FootprintStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._clock = clock
        self._t0 = clock()
        self.device: Device = device if device is not None else self._make_device(config)
        self.backends: dict[str, Backend] = dict(backends or {})
        for name, spec in config.models.items():
            if name not in self.backends:
                self.backends[name] = self._make_backend(spec)
        self.policy = Policy(exclusive_kinds=config.exclusive_kinds)
        self.hub = EventHub()
        self.footprints = footprints if footprints is not None else open_store(config)
        self.monitor = VRAMMonitor(self.device, config, footprints=self.footprints)
        self.sampler = PeakSampler(self.device, config.sample_hz)

        # Invariants (checked by tests/orchestrator/test_properties.py after every step):
        # - self._ledger.committed_bytes <= budget; a load begins only when plan.after fits;
        # - self._machine.state == active_state(self._ledger) unless a switch is running;
        # - every waiter is in self._waiters until granted, failed, timed out or cancelled;
        # - self._leases[m] > 0 only for models on the GPU.
        self._ledger = Ledger(budget_bytes=config.budget_bytes, host_budget_bytes=config.host_budget_bytes)
        self._machine = ModelMachine()
        self._switch_lock = anyio.Lock()
        self._waiters: list[_Waiter] = []
        self._leases: dict[str, int] = {}
        self._holders: dict[str, dict[Hashable, int]] = {}  # model -> task id -> leases it holds
        self._draining: frozenset[str] = frozenset()
        self._lost_gpu_s: dict[str, float] = {}
        self._backoff_until: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._last_error: dict[str, BaseException] = {}
        self._deferred: dict[str, Deferred] = {}
        self._reap_after: dict[str, float] = {}
        self._rebalance_after = 0.0
        # residents to unload once idle (no new leases meanwhile), and why: a reload at a
        # learned size, or unload() asked for it
        self._to_unload: dict[str, str] = {}
        self._lease_scopes: dict[str, dict[anyio.CancelScope, BackendCrashed | None]] = {}
        self._watch_scopes: dict[str, anyio.CancelScope] = {}
        self._seq = 0
        self._wake = anyio.Event()
        self._tg: TaskGroup | None = None
        self._running = False
        self._closing = False
        self._on_close: list[Callable[[], None]] = []
        # Reservations for external programs (reserve()): id -> reservation, while held or
        # waited for; and the ids whose program was seen using more than it reserved.
        self._externals: dict[str, ExternalReservation] = {}
        self._overusing: set[str] = set()
        self._external_seq = 0

        self._switches = self._failed_switches = self._loads = self._restores = 0
        self._evictions = self._grants = self._releases = self._timeouts = self._cancellations = 0
        self._switching_s = 0.0
        # The latest waits, for percentiles (bounded: a daemon runs for months), and totals.
        self._wait_times: deque[float] = deque(maxlen=WAIT_SAMPLES)
        self._wait_count = 0
        self._wait_sum_s = 0.0
        self._wait_max_s = 0.0
        self._peak_committed = 0

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_config(cls, path: str | Path | None = None, **kwargs: Any) -> Orchestrator:
        """Build from a YAML file (``None``: the embedded default, the simulated 16 GiB GPU)."""
        return cls(load_config(path), **kwargs)

    @staticmethod
    def _make_device(config: Config) -> Device:
        try:
            return open_device(
                config.device, config.device_index, total_bytes=config.total_bytes, name=config.gpu_name
            )
        except DeviceUnavailable as exc:
            raise ConfigError(
                config.source,
                "hardware.device",
                f"{config.device!r} cannot be used here: {exc}",
                "use `device: auto` (NVML, then torch, then the simulated device) or `device: simulated`",
            ) from None

    def _make_backend(self, spec: ModelSpec) -> Backend:
        log_dir = default_path().parent / "logs"
        return create_backend(spec, config=self.config, device=self.device, log_dir=log_dir)

    # -- reading -----------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._machine.state

    def ledger(self) -> Ledger:
        """A frozen snapshot of the ledger."""
        return self._ledger

    def now_s(self) -> float:
        return self._clock() - self._t0

    def backend(self, name_or_kind: str) -> Backend:
        return self.backends[self.resolve(name_or_kind).name]

    def resolve(self, name_or_kind: str) -> ModelSpec:
        spec = self.config.resolve(name_or_kind)
        if spec is None:
            raise UnknownModel(name_or_kind, list(self.config.models), list(self.config.defaults))
        return spec

    def statistics(self) -> Statistics:
        waits = sorted(self._wait_times)
        waiting: dict[str, int] = {}
        for w in self._waiters:
            waiting[w.model] = waiting.get(w.model, 0) + 1
        return Statistics(
            state=self.state,
            switches=self._switches,
            failed_switches=self._failed_switches,
            loads=self._loads,
            restores=self._restores,
            evictions=self._evictions,
            grants=self._grants,
            releases=self._releases,
            timeouts=self._timeouts,
            cancellations=self._cancellations,
            active_leases={m: n for m, n in self._leases.items() if n},
            waiting=waiting,
            switching_s=self._switching_s,
            waits=WaitStats(
                count=self._wait_count,
                mean_s=self._wait_sum_s / self._wait_count if self._wait_count else 0.0,
                p50_s=_percentile(waits, 0.50),
                p99_s=_percentile(waits, 0.99),
                max_s=self._wait_max_s,
            ),
            peak_committed_bytes=self._peak_committed,
        )

    @property
    def running(self) -> bool:
        """Inside ``async with orch`` (and not shutting down)."""
        return self._running and not self._closing

    def leases(self) -> Mapping[str, int]:
        """Active leases per model (a copy: safe to call from another thread)."""
        return {m: n for m, n in dict(self._leases).items() if n}

    def waiting(self) -> list[tuple[str, int, float]]:
        """The queue: (model, priority, seconds waited), in arrival order (a copy)."""
        now = self.now_s()
        return [(w.model, w.priority, now - w.arrived_s) for w in list(self._waiters)]

    def last_errors(self) -> Mapping[str, BaseException]:
        """The error of each model whose last switch failed (cleared by its next success)."""
        return dict(self._last_error)

    def add_listener(self, fn: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``fn(event)`` for every event; returns a function that unsubscribes."""
        return self.hub.add_listener(fn)

    def events(self, buffer: int = 1000) -> AsyncIterator[Event]:
        """Async iterator over events from now on (drops events when ``buffer`` is full)."""
        return self.hub.subscribe(buffer)

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Orchestrator:
        if self._running:
            raise RuntimeError("this orchestrator is already running")
        self._closing = False
        if self.config.events_path:
            self._open_event_log(self.config.events_path)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._running = True
        tg.start_soon(self._schedule_loop, name="vram-orchestrator scheduler")
        if self.config.sample_hz > 0:
            tg.start_soon(self.sampler.run, name="vram-orchestrator peak sampler")
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
        for w in list(self._waiters):
            self._fail_waiter(w, NotRunning())
        tg, self._tg = self._tg, None
        tg.cancel_scope.cancel()
        try:
            await tg.__aexit__(None, None, None)
        finally:
            self._running = False
            try:
                with anyio.CancelScope(shield=True):
                    await self._unload_everything()
            finally:
                for fn in self._on_close:
                    fn()
                self._on_close.clear()

    async def _unload_everything(self) -> None:
        # Leases held by tasks outside the `async with orch` block get a grace period.
        with anyio.move_on_after(self.config.unload_timeout_s):
            while any(self._leases.values()):  # noqa: ASYNC110 - leases end in other tasks; poll briefly
                await anyio.sleep(RELEASE_POLL_S)
        async with self._switch_lock:
            target = self._ledger
            for r in target.residents:
                target = target.move(r.model, Tier.DISK)
            if self._ledger.residents:
                t0 = self.now_s()
                self._fire("begin_switch", target, model=None, detail="shutdown: unloading everything")
                for r in list(self._ledger.residents):
                    backend = self.backends[r.model]
                    self._stop_watch(r.model)
                    try:
                        with anyio.fail_after(self.config.unload_timeout_s):
                            await backend.unload()
                        await self._wait_released([r.model] if r.tier is Tier.GPU else [])
                        self._ledger = self._ledger.move(r.model, Tier.DISK)
                        self._emit("evict", model=r.model, detail=f"{r.tier.value} -> disk (shutdown)")
                    except Exception as exc:
                        logger.error("could not unload %s at shutdown: %s", r.model, exc)
                trigger = "fail_switch" if self._ledger.residents else "finish_switch"
                self._fire(trigger, self._ledger, model=None, t0=t0)
            for b in list(self.backends.values()):
                try:
                    with anyio.fail_after(self.config.unload_timeout_s):
                        await b.aclose()
                except Exception as exc:
                    logger.error("closing backend %s failed: %s", b.name, exc)
            try:
                await self._wait_released(list(self.backends))
            except VRAMNotReleased as exc:
                logger.error("at shutdown: %s", exc)

    async def unload(self, name_or_kind: str, *, timeout: float | None = None) -> None:
        """Unload a model (from the GPU and the host tier) as soon as its leases end; no new
        lease is granted on it meanwhile. Returns when its memory is back.

        :raises AcquireTimeout: the model's leases did not end within ``timeout``.
        """
        spec = self.resolve(name_or_kind)
        if not self.running:
            raise NotRunning()
        if self._ledger.get(spec.name) is None:
            return
        self._to_unload[spec.name] = "unload requested"
        self._wake.set()
        try:
            with anyio.fail_after(timeout):
                while self._ledger.get(spec.name) is not None:  # noqa: ASYNC110 - the scheduler does it
                    await anyio.sleep(RELEASE_POLL_S)
        except TimeoutError:
            self._to_unload.pop(spec.name, None)
            raise AcquireTimeout(
                spec.name, timeout or 0.0, 0, sum(self.leases().values()), "its leases did not end"
            ) from None

    # -- acquire -----------------------------------------------------------------------------

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
        if not self._running or self._closing:
            raise NotRunning()
        if spec.vram_bytes > self.config.budget_bytes:
            raise InsufficientVRAM(
                spec.name, spec.vram_bytes, self.config.budget_bytes, self.config.budget_bytes
            )
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds, got {timeout}")
        async with self._hold(spec.name, spec.kind, timeout, priority, owner) as lease:
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
        if not self._running or self._closing:
            raise NotRunning()
        if n_bytes > self.config.budget_bytes:
            raise InsufficientVRAM(
                "external reservation",
                n_bytes,
                self.config.budget_bytes,
                self.config.budget_bytes,
                advice="ask for less, or raise hardware.safe_max_vram_gb",
            )
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds, got {timeout}")
        self._external_seq += 1
        rid = f"external-{self._external_seq}"
        reservation = ExternalReservation(rid, n_bytes, pid, holder, self.now_s())
        self._externals[rid] = reservation
        self.backends[rid] = _ExternalBackend(reservation)
        try:
            async with self._hold(rid, EXTERNAL_KIND, timeout, priority, owner) as lease:
                yield lease
        finally:
            self._end_external(rid)

    def external_reservations(self) -> list[ExternalReservation]:
        """The reservations for external programs, held or waited for (a copy)."""
        return list(self._externals.values())

    def _end_external(self, rid: str) -> None:
        """The reservation's lease ended (or it never got one): its bytes leave the ledger."""
        self._externals.pop(rid, None)
        self._overusing.discard(rid)
        planned = self._ledger.get(rid) is not None or (
            self._ledger.loading is not None and self._ledger.loading.model == rid
        )
        if self._machine.state is State.SWITCHING:
            # A switch is under way (perhaps the one that admits this very reservation): the
            # scheduler drops it once that switch is over (see _unload_requested).
            self._to_unload[rid] = "external reservation ended"
            self._wake.set()
            return
        if planned:
            before = self._ledger.committed_bytes
            self._ledger = self._ledger.move(rid, Tier.DISK)
            self._emit(
                "external_end",
                model=rid,
                bytes_before=before,
                bytes_after=self._ledger.committed_bytes,
                detail="reservation ended: its bytes are free for our models again",
            )
            self._wake.set()
        backend = self.backends.get(rid)
        if isinstance(backend, _ExternalBackend) and backend.tier is Tier.GPU:
            backend._tier = Tier.DISK
        self.backends.pop(rid, None)

    def _forget_ended_externals(self) -> None:
        """Drop the stand-ins of reservations that ended during a switch, once unloaded."""
        for name in [n for n, b in self.backends.items() if isinstance(b, _ExternalBackend)]:
            if name not in self._externals and self._ledger.get(name) is None and name not in self._to_unload:
                del self.backends[name]

    def check_external_usage(self) -> list[tuple[ExternalReservation, int]]:
        """(reservation, bytes its program uses now) for each held reservation with a pid.

        A program seen using more than it reserved gets an ``external_overuse`` event (once
        per episode); its memory beyond the reservation counts as foreign meanwhile, so the
        budget stays safe, but our models may have to wait or be evicted for it.
        """
        held = [r for r in self._externals.values() if r.pid is not None and self._ledger.on_gpu(r.id)]
        if not held:
            return []
        procs = dict(foreign_processes(self.device.read()))
        out = []
        for r in held:
            assert r.pid is not None
            used = procs.get(r.pid, 0)
            out.append((r, used))
            if used > r.vram_bytes and r.id not in self._overusing:
                self._overusing.add(r.id)
                logger.warning(
                    "external program pid %d uses %s, more than its reservation %s of %s",
                    r.pid, format_gib(used), r.id, format_gib(r.vram_bytes),
                )  # fmt: skip
                self._emit(
                    "external_overuse",
                    model=r.id,
                    bytes_after=used,
                    detail=f"pid {r.pid} uses {format_gib(used)}, reserved {format_gib(r.vram_bytes)} "
                    f"(over by {format_gib(used - r.vram_bytes)})",
                )
            elif used <= r.vram_bytes:
                self._overusing.discard(r.id)
        return out

    def emit_event(self, kind: str, *, model: str | None = None, detail: str | None = None) -> None:
        """Add an event of the caller's (the daemon's lease expiry, for one) to the stream."""
        self._emit(kind, model=model, detail=detail)

    @asynccontextmanager
    async def _hold(
        self, model: str, kind: str, timeout: float | None, priority: int, owner: Hashable | None = None
    ) -> AsyncIterator[Lease]:
        """Queue a waiter for ``model``, wait for the grant, hold the lease for the block.

        ``owner`` is who holds the lease for deadlock detection: the current task unless
        given (the daemon gives a remote client's task, whose leases it holds in tasks of its
        own).
        """
        spec_name = model
        await anyio.lowlevel.checkpoint_if_cancelled()
        self._seq += 1
        task = anyio.get_current_task()
        w = _Waiter(self._seq, spec_name, priority, self.now_s(), task.id if owner is None else owner)
        self._waiters.append(w)
        if self._uncontended(spec_name):
            # What the scheduler would decide anyway, without the round trip through it: the
            # model is on the GPU, nothing drains it and nobody else waits for anything.
            self._grant(w)
        else:
            self._wake.set()
        try:
            if not w.granted:
                with anyio.fail_after(timeout):
                    await w.event.wait()
        except BaseException as exc:
            position, queued = self._position(w), len(self._waiters)
            self._forget(w)
            if w.granted:  # granted in the same instant we were cancelled: give it back
                self._release(w.model, w.task_id)
            if isinstance(exc, TimeoutError) and timeout is not None:
                self._timeouts += 1
                self._emit("timeout", model=w.model, detail=f"after {timeout:g} s, position {position}")
                raise AcquireTimeout(
                    w.model, timeout, position, queued, self._holding_text(w.model)
                ) from None
            self._cancellations += 1
            self._emit("cancel", model=w.model)
            raise
        if w.error is not None:
            raise w.error
        waited = self.now_s() - w.arrived_s
        self._wait_times.append(waited)
        self._wait_count += 1
        self._wait_sum_s += waited
        self._wait_max_s = max(self._wait_max_s, waited)
        lease = Lease(spec_name, kind, self.backends[spec_name].handle, waited, priority)
        # If the model's process dies while the block runs, the block is cancelled and
        # BackendCrashed raised from it (see _on_crash).
        scope = anyio.CancelScope()
        self._lease_scopes.setdefault(spec_name, {})[scope] = None
        try:
            with scope:
                yield lease
        finally:
            lease._end()
            crash = self._lease_scopes.get(spec_name, {}).pop(scope, None)
            self._release(spec_name, w.task_id)
        if crash is not None and scope.cancelled_caught:
            raise crash

    def _holding_text(self, model: str) -> str:
        text = self._ledger.describe()
        deferred = self._deferred.get(model)
        if deferred is not None:
            text += f"; {deferred.reason}{self._foreign_pids_text()}"
        return text

    def _uncontended(self, model: str) -> bool:
        return (
            len(self._waiters) == 1
            and self._machine.state is not State.SWITCHING
            and model not in self._draining
            and model not in self._to_unload
            and self._ledger.on_gpu(model)
        )

    def _position(self, w: _Waiter) -> int:
        same = [x for x in self._waiters if x.model == w.model]
        return same.index(w) + 1 if w in same else 0

    def _forget(self, w: _Waiter) -> None:
        if w in self._waiters:
            self._waiters.remove(w)
            self._wake.set()

    def _release(self, model: str, task_id: Hashable) -> None:
        self._leases[model] -= 1
        holders = self._holders[model]
        holders[task_id] -= 1
        if not holders[task_id]:
            del holders[task_id]
        self._ledger = self._ledger.touch(model)
        self._note_use_peak(model)
        self._releases += 1
        self._emit("release", model=model)
        if self._waiters or not self._ledger.fits():  # otherwise a release changes no decision
            self._wake.set()

    def _grant(self, w: _Waiter) -> None:
        w.granted = True
        self._waiters.remove(w)
        self._leases[w.model] = self._leases.get(w.model, 0) + 1
        holders = self._holders.setdefault(w.model, {})
        holders[w.task_id] = holders.get(w.task_id, 0) + 1
        self._ledger = self._ledger.touch(w.model)
        self._grants += 1
        self._emit("grant", model=w.model, duration_s=self.now_s() - w.arrived_s)  # the wait
        w.event.set()

    def _fail_waiter(self, w: _Waiter, error: BaseException) -> None:
        w.error = error
        if w in self._waiters:
            self._waiters.remove(w)
        w.event.set()

    # -- the scheduler -----------------------------------------------------------------------

    async def _schedule_loop(self) -> None:
        while True:
            self._wake = anyio.Event()
            delay = await self._step()
            if delay == 0:
                continue
            with anyio.move_on_after(delay):
                await self._wake.wait()

    def accounted_bytes(self) -> int:
        """What our GPU residents hold: measured where the backend can tell, else what the
        ledger planned. The rest of the device's used memory is foreign."""
        return sum(r.vram_bytes if held is None else held for r, held in self._holdings())

    def _holdings(self) -> list[tuple[Resident, int | None]]:
        return [
            (r, self.backends[r.model].measured_bytes(live_only=True)) for r in self._ledger.gpu_residents
        ]

    def _refresh_foreign(self) -> None:
        """Bytes on the device that the ledger does not account for shrink the room; a
        resident measured larger than planned is entered at its measured size."""
        accounted = 0
        for r, held in self._holdings():
            accounted += r.vram_bytes if held is None else held
            if held is not None and held > r.vram_bytes:
                self._ledger = self._ledger.resize(r.model, held)
                self._learn(r.model, held, "peak")
                self._emit(
                    "resize",
                    model=r.model,
                    bytes_after=held,
                    detail=f"holds {format_gib(held)}, planned at {format_gib(r.vram_bytes)}",
                )
        foreign = max(0, self.device.used_bytes() - accounted)
        if foreign != self._ledger.foreign_bytes:
            self._ledger = self._ledger.with_foreign(foreign)

    def estimate(self, name_or_kind: str) -> ModelEstimate:
        """What the orchestrator plans with for a model: configured, or learned when larger."""
        return planning_estimate(self.resolve(name_or_kind), self.footprints, self.config)

    def _request(self, model: str) -> PlanRequest:
        external = self._externals.get(model)
        if external is not None:
            return PlanRequest(model=model, kind=EXTERNAL_KIND, vram_bytes=external.vram_bytes, external=True)
        spec = self.config.models[model]
        return PlanRequest(
            model=model,
            kind=spec.kind,
            vram_bytes=self.estimate(model).estimated_vram_bytes,
            configured_bytes=spec.vram_bytes,
            offloadable=spec.offload and self.backends[model].supports_host_tier,
            host_bytes=spec.host_bytes,
        )

    async def _reap_leftovers(self, now: float) -> list[float]:
        """Unload what a backend still holds but the ledger does not (a failed cleanup).

        Such memory counts as foreign meanwhile, so the budget stays safe; this gives it back.
        Returns the times at which to try again.
        """
        retry_at: list[float] = []
        for name, b in list(self.backends.items()):
            if b.tier is Tier.DISK or self._ledger.get(name) is not None:
                continue
            until = self._reap_after.get(name, 0.0)
            if until > now:
                retry_at.append(until)
                continue
            try:
                with self._switching():
                    with anyio.fail_after(self.config.unload_timeout_s):
                        await b.unload()
                self._reap_after.pop(name, None)
                self._emit("evict", model=name, detail="left over by a failed cleanup: unloaded")
            except Exception as exc:
                self._reap_after[name] = now + max(self.config.retry_backoff_s, RELEASE_POLL_S)
                retry_at.append(self._reap_after[name])
                logger.warning("%s still holds memory after a failed cleanup; retrying: %s", name, exc)
        return retry_at

    async def _step(self) -> float | None:
        """Decide once: grant, drain, switch. Returns how long to sleep (None: until poked)."""
        now = self.now_s()
        self._forget_ended_externals()
        reap_at = await self._reap_leftovers(now)
        self._refresh_foreign()
        self.check_external_usage()
        blocked = {m for m, until in self._backoff_until.items() if until > now}
        wake_at: list[float] = [u for m, u in self._backoff_until.items() if u > now] + reap_at
        on_gpu = frozenset(r.model for r in self._ledger.gpu_residents)
        # Re-entrant acquires (a task that already holds the model) are granted even while
        # the model drains: the drain waits for this very task's lease.
        for w in [
            w for w in self._waiters if w.model in on_gpu and self._holders.get(w.model, {}).get(w.task_id)
        ]:
            self._grant(w)

        def view() -> SchedulerView:
            return SchedulerView(
                now_s=now,
                waiters=tuple(WaiterView(w.seq, w.model, w.priority, w.arrived_s) for w in self._waiters),
                on_gpu=on_gpu,
                leases=self._leases,
                lost_gpu_s=self._lost_gpu_s,
                blocked=frozenset(blocked),
                mode=self.config.mode,
                fairness_s=self.config.fairness_s,
                max_wait_s=self.config.max_wait_s,
            )

        self._break_deadlocks()
        if self._rebalance_after > now:
            wake_at.append(self._rebalance_after)
        elif not self._ledger.fits() and await self._rebalance():
            return 0  # residents changed: decide again from a fresh view
        elif await self._unload_requested():
            return 0

        # Choose a target whose plan is possible now; foreign memory may defer some.
        target: str | None = None
        chosen: Plan | None = None
        self._deferred.clear()
        while True:
            target = choose_target(view())
            if target is None:
                break
            try:
                p = plan(self._request(target), self._ledger, self.policy)
            except InsufficientVRAM as exc:
                for w in [w for w in self._waiters if w.model == target]:
                    self._fail_waiter(w, exc)
                continue
            if isinstance(p, Deferred):
                self._deferred[target] = p
                if self.config.foreign_memory == "fail":
                    err = InsufficientVRAM(
                        target,
                        p.needed_bytes,
                        p.available_bytes,
                        self.config.budget_bytes,
                        reason=p.reason + self._foreign_pids_text(),
                        advice="wait for those processes to end, or set switching.foreign_memory: wait",
                    )
                    for w in [w for w in self._waiters if w.model == target]:
                        self._fail_waiter(w, err)
                    continue
                blocked.add(target)
                wake_at.append(now + DEFERRED_POLL_S)
                continue
            chosen = p
            break

        evictees = frozenset(e.model for e in chosen.gpu_evictions) if chosen else frozenset()
        v = view()
        adm = admission(v, target, evictees)
        self._draining = adm.drain | set(self._to_unload)
        for w in [w for w in self._waiters if w.seq in adm.grant and w.model not in self._to_unload]:
            self._grant(w)

        if chosen is None or target is None:
            return self._delay(now, wake_at)

        busy = [m for m in evictees if self._leases.get(m, 0)]
        if busy:
            if not adm.drain:  # wake when the fairness bound passes
                oldest = min(v.since_s(w) for w in v.waiters if w.model == target)
                wake_at.append(oldest + self.config.fairness_s)
            # Meanwhile, a model that fits beside what is resident loads without delaying
            # anyone (a TTS beside a busy SDXL): it evicts nothing.
            side = self._side_load(v, target) if self.config.mode is Mode.FAIR else None
            if side is None:
                return self._delay(now, wake_at)
            chosen = side

        await self._switch(chosen)
        return 0

    async def _rebalance(self) -> bool:
        """Over the room (foreign memory grew, or a model holds more than planned): evict idle
        models, light and least recently used first, until the ledger fits again."""
        ledger = self._ledger
        idle = sorted(
            (r for r in ledger.gpu_residents if not self._leases.get(r.model)),
            key=lambda r: (r.exclusive, r.last_used),
        )
        victims = []
        for r in idle:
            if ledger.fits():
                break
            victims.append(r.model)
            ledger = ledger.move(r.model, Tier.DISK)
        if not victims:
            return False  # every resident is in use: their releases wake the scheduler
        logger.warning("over the room (%s): evicting %s", self._ledger.describe(), ", ".join(victims))
        await self._evict_only(victims, "over the room")
        return True

    async def _evict_only(self, victims: list[str], why: str) -> None:
        """A switch that loads nothing: unload ``victims`` (idle GPU residents) to disk."""
        after = self._ledger
        for m in victims:
            after = after.move(m, Tier.DISK)
        with self._switching():
            t0 = self.now_s()
            self._fire("begin_switch", after, model=None, detail=f"unloading {', '.join(victims)} ({why})")
            try:
                for m in victims:
                    self._stop_watch(m)
                    with anyio.fail_after(self.config.unload_timeout_s):
                        await self.backends[m].unload()
                    self._ledger = self._ledger.move(m, Tier.DISK)
                    self._note_lost(m)
                    self._evictions += 1
                    self._emit("evict", model=m, detail=f"gpu -> disk ({why})")
                await self._wait_released(victims)
            except Exception as exc:
                logger.error("evicting %s (%s) failed: %s", ", ".join(victims), why, exc)
                self._rebalance_after = self.now_s() + max(self.config.retry_backoff_s, RELEASE_POLL_S)
            finally:
                self._fire("finish_switch", self._ledger, model=None, t0=t0)

    async def _unload_requested(self) -> bool:
        """Unload the residents marked for it (``unload()``, or a use peak that outgrew the
        model's reservation: it reloads at its learned size on its next acquire) once idle."""
        for m in [m for m in self._to_unload if self._ledger.get(m) is None]:
            del self._to_unload[m]
        idle = sorted(m for m in self._to_unload if not self._leases.get(m))
        if not idle:
            return False
        reasons = {self._to_unload.pop(m) for m in idle}
        await self._evict_only(idle, "; ".join(sorted(reasons)))
        return True

    def _side_load(self, v: SchedulerView, target: str) -> Plan | None:
        for model in rank_targets(v):
            if model == target:
                continue
            try:
                p = plan(self._request(model), self._ledger, self.policy)
            except InsufficientVRAM:
                continue
            if isinstance(p, Plan) and not p.gpu_evictions:
                return p
        return None

    def _delay(self, now: float, wake_at: list[float]) -> float | None:
        overdue_at = [w.arrived_s + self.config.max_wait_s for w in self._waiters]
        if self._ledger.gpu_residents:
            # Foreign memory can grow while nothing happens here: look at the device now
            # and then (at the sampler's rate, at least once a second).
            period = min(1.0, 1.0 / self.config.sample_hz) if self.config.sample_hz > 0 else 1.0
            overdue_at.append(now + period)
        times = [t for t in [*wake_at, *overdue_at] if t > now]
        return max(0.0005, min(times) - now) if times else None

    def _kind_bytes(self, model: str) -> tuple[str, int]:
        external = self._externals.get(model)
        if external is not None:
            return EXTERNAL_KIND, external.vram_bytes
        spec = self.config.models.get(model)
        if spec is None:  # a reservation that ended meanwhile
            return EXTERNAL_KIND, 0
        return spec.kind, spec.vram_bytes

    def _break_deadlocks(self) -> None:
        """Fail a waiter whose own task holds a lease on a model that must leave for it.

        Its model can load only after that lease ends, and the lease ends only after the
        waiter is served: it would wait forever (and hold up everyone behind it).
        """
        for w in list(self._waiters):
            kind, n_bytes = self._kind_bytes(w.model)
            for held, by_task in self._holders.items():
                if held == w.model or not by_task.get(w.task_id):
                    continue
                other_kind, other_bytes = self._kind_bytes(held)
                both_heavy = self.policy.is_exclusive(kind) and self.policy.is_exclusive(other_kind)
                if both_heavy or n_bytes + other_bytes > self.config.budget_bytes:
                    self._fail_waiter(w, LeaseDeadlock(w.model, held))
                    break

    # -- the executor ------------------------------------------------------------------------

    def _fire(
        self,
        trigger: str,
        ledger: Ledger,
        *,
        model: str | None,
        t0: float | None = None,
        detail: str | None = None,
    ) -> None:
        before_state = self._machine.state
        before_bytes = self._ledger.committed_bytes
        self._machine.fire(trigger, ledger)
        self._emit(
            "transition",
            model=model,
            trigger=trigger,
            from_state=before_state.name,
            to_state=self._machine.state.name,
            bytes_before=before_bytes,
            bytes_after=ledger.committed_bytes,
            duration_s=None if t0 is None else self.now_s() - t0,
            detail=detail,
        )

    def _emit(self, kind: str, **kw: Any) -> None:
        self._peak_committed = max(self._peak_committed, self._ledger.committed_bytes)
        # Every event carries the ledger's committed bytes and budget as they are now: the
        # budget invariant can be checked from the event stream alone.
        kw.setdefault("committed_bytes", self._ledger.committed_bytes)
        kw.setdefault("budget_bytes", self._ledger.budget_bytes)
        self.hub.emit(Event(time_s=self.now_s(), kind=kind, **kw))

    async def _switch(self, p: Plan) -> None:
        with self._switching():
            t0 = self.now_s()
            target = p.load
            self._fire("begin_switch", p.after, model=target)
            try:
                await self._evict(p)
                await self._load(p)
            except BaseException as exc:
                self._fire("fail_switch", self._ledger, model=target, t0=t0)
                self._failed_switches += 1
                self._switching_s += self.now_s() - t0
                if isinstance(exc, _NoRoom):
                    # Memory appeared that the ledger did not know of: nobody failed; the
                    # next step reads the device again and waits for room (or fails, per
                    # switching.foreign_memory).
                    self._backoff_until[target] = self.now_s() + DEFERRED_POLL_S
                    self._emit("fail", model=target, detail=str(exc.error))
                    return
                if isinstance(exc, Exception):
                    self._record_failure(target, exc)
                    return  # the waiters got the error; the scheduler goes on
                raise
            self._switching_s += self.now_s() - t0
            self._switches += 1
            self._failures.pop(target, None)
            self._last_error.pop(target, None)
            self._backoff_until.pop(target, None)
            self._fire("finish_switch", self._ledger, model=target, t0=t0)
            if self.config.mode is not Mode.FCFS:
                # Everyone waiting for the new model is served together, before anything
                # else is decided (in fcfs mode the next step serves them in arrival order).
                for w in [w for w in self._waiters if w.model == target]:
                    self._grant(w)

    async def _evict(self, p: Plan) -> None:
        freed: list[str] = []
        for e in p.evictions:
            backend = self.backends[e.model]
            self._stop_watch(e.model)
            t0 = self.now_s()
            try:
                with anyio.fail_after(self.config.unload_timeout_s):
                    if e.to_tier is Tier.HOST:
                        await backend.offload(Tier.HOST)
                    else:
                        await backend.unload()
            except BaseException as exc:
                # Unknown how far it got: finish the unload (idempotent), shielded, bounded;
                # then believe the backend about what is still loaded.
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.config.unload_timeout_s):
                    try:
                        await backend.unload()
                    except Exception as again:
                        logger.warning("second unload of %s failed too: %s", e.model, again)
                if not backend.is_loaded() and backend.tier is Tier.DISK:
                    self._ledger = self._ledger.move(e.model, Tier.DISK)
                    self._note_lost(e.model)
                    self._emit(
                        "evict", model=e.model, detail=f"{e.from_tier.value} -> disk (after a failed unload)"
                    )
                if isinstance(exc, Exception):
                    detail = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
                    raise UnloadFailed(e.model, f"{detail} while evicting it for {p.load!r}") from exc
                raise
            # A backend may fall back from keeping a host copy to dropping it (a vLLM server
            # that cannot sleep): the ledger follows what it really did.
            landed = backend.tier if backend.tier is not Tier.GPU else e.to_tier
            self._ledger = self._ledger.move(e.model, landed)
            self._evictions += 1
            if e.from_tier is Tier.GPU:
                self._note_lost(e.model)
                freed.append(e.model)
            self._emit(
                "evict",
                model=e.model,
                duration_s=self.now_s() - t0,
                detail=f"{e.from_tier.value} -> {landed.value} for {p.load}",
            )
        await self._wait_released(freed)

    @contextmanager
    def _switching(self) -> Iterator[None]:
        """Hold the switch lock, taken without a checkpoint.

        The scheduler decides and starts a switch in one synchronous stretch: if taking the
        lock yielded, a lease could be granted (acquire's fast path) on a model the switch is
        about to evict. The scheduler is the only switcher while running, so the lock is free.
        """
        self._switch_lock.acquire_nowait()
        try:
            yield
        finally:
            self._switch_lock.release()

    def _start_watch(self, model: str) -> None:
        """Notice the model's process exit at once, not at the next health check."""
        backend = self.backends[model]
        if type(backend).wait_exit is Backend.wait_exit or self._tg is None:
            return  # this backend has no process of its own
        self._stop_watch(model)
        scope = anyio.CancelScope()
        self._watch_scopes[model] = scope
        self._tg.start_soon(self._watch, model, scope, name=f"vram-orchestrator watch {model}")

    def _stop_watch(self, model: str) -> None:
        scope = self._watch_scopes.pop(model, None)
        if scope is not None:
            scope.cancel()

    async def _watch(self, model: str, scope: anyio.CancelScope) -> None:
        with scope:
            reason = await self.backends[model].wait_exit()
            self._watch_scopes.pop(model, None)
            self._on_crash(model, reason)

    def _on_crash(self, model: str, reason: str) -> None:
        """A resident's process died: the ledger and the machine are made true again at once,
        its leases get BackendCrashed, and the next acquire starts it again."""
        if self._ledger.get(model) is None:
            return
        err = BackendCrashed(model, reason)
        self._ledger = self._ledger.move(model, Tier.DISK)
        self._note_lost(model)
        for scope in self._lease_scopes.get(model, {}):
            self._lease_scopes[model][scope] = err
            scope.cancel()
        if self._machine.state is not State.SWITCHING:
            self._fire("settle", self._ledger, model=model, detail="crashed")
        n, backoff = self._back_off(model, err)
        logger.error("%s crashed (%d in a row; restart allowed in %.2f s): %s", model, n, backoff, reason)
        self._emit("crash", model=model, detail=reason)
        self._wake.set()  # the reaper stops what is left of it; waiters get it restarted

    def _note_lost(self, model: str) -> None:
        self._lost_gpu_s[model] = self.now_s()

    async def _wait_released(self, models: list[str]) -> None:
        """Wait until the device shows the evicted models' memory back, with a deadline."""
        if not models:
            return

        def still_held() -> list[tuple[str, int]]:
            return [(m, self.backends[m].measured_bytes(live_only=False) or 0) for m in models]

        await wait_released(still_held, timeout_s=self.config.unload_timeout_s, poll_s=RELEASE_POLL_S)

    def _check_room(self, model: str, needed_bytes: int) -> None:
        """Before a load, the device must really have the room, not only the ledger."""
        reading = self.device.read()
        # Room on the card, and room within the budget for everything the card holds (ours,
        # other processes', the driver's): the ledger's rule, checked against the device.
        room = min(reading.free_bytes, self.config.budget_bytes - reading.used_bytes)
        if room >= needed_bytes:
            return
        raise _NoRoom(
            InsufficientVRAM(
                model,
                needed_bytes,
                max(0, room),
                self.config.budget_bytes,
                reason=f"the device has {format_gib(reading.free_bytes)} free and "
                f"{format_gib(reading.used_bytes)} in use" + self._foreign_pids_text(reading),
            )
        )

    def _foreign_pids_text(self, reading: DeviceReading | None = None) -> str:
        others = foreign_processes(reading or self.device.read())
        return f"; other processes: {describe_processes(others)}" if others else ""

    def _learn(self, model: str, measured_bytes: int | None, kind: str) -> None:
        """Keep what a model really took, when it is more than known (file IO only then)."""
        if not self.config.learn_footprints or measured_bytes is None or measured_bytes <= 0:
            return
        old = self.footprints.get(model)
        if old is not None and measured_bytes <= (old.load_bytes if kind == "load" else old.high_water_bytes):
            return
        fp = self.footprints.record(model, measured_bytes, kind=kind)
        configured = self.config.models[model].vram_bytes
        self._emit(
            "learn",
            model=model,
            bytes_after=fp.high_water_bytes,
            detail=f"{kind}: measured {format_gib(measured_bytes)}, configured {format_gib(configured)} "
            f"(drift {'+' if measured_bytes >= configured else ''}{format_gib(measured_bytes - configured)})",
        )

    def _note_use_peak(self, model: str) -> None:
        peak = self.backends[model].peak_bytes()
        self._learn(model, peak, "peak")
        r = self._ledger.get(model)
        if r is not None and r.tier is Tier.GPU and peak is not None and peak > r.vram_bytes:
            # It needed more than it was loaded with: no new lease on it until it has been
            # reloaded at its learned size (the scheduler does that once it is idle).
            self._to_unload[model] = "reload at its learned size"
            self._wake.set()

    async def _load(self, p: Plan) -> None:
        backend = self.backends[p.load]
        resident = p.after.loading
        assert resident is not None
        self._check_room(p.load, resident.vram_bytes)
        self._ledger = self._ledger.begin_load(resident)
        t0 = self.now_s()
        try:
            # The backend may not take more than the bytes the ledger reserves for it: a
            # model bigger than its estimate fails to load (and is learned) instead of
            # pushing the device past the budget.
            with anyio.fail_after(self.config.load_timeout_s):
                if p.from_tier is Tier.HOST:
                    await backend.restore(limit_bytes=resident.vram_bytes)
                else:
                    await backend.load(limit_bytes=resident.vram_bytes)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(self.config.unload_timeout_s):
                    try:
                        await backend.unload()
                    except Exception as again:
                        logger.error("cleanup of failed load of %s failed: %s", p.load, again)
                still = backend.measured_bytes(live_only=False)
                if still:
                    # The memory stayed: it is no longer ours in the ledger, so it counts as
                    # foreign until the device shows it gone (see _refresh_foreign).
                    logger.error("failed load of %s left %s on the device", p.load, format_gib(still))
                self._ledger = self._ledger.abort_load()
            if isinstance(exc, DeviceOutOfMemory):
                self._learn(p.load, exc.requested_bytes, "peak")
                est = self.estimate(p.load)
                nxt = (
                    f"; it needs {format_gib(exc.requested_bytes)}, learned: it is planned at "
                    f"{format_gib(est.estimated_vram_bytes)} from now on"
                    if est.source == "measured"
                    else ""
                )
                raise BackendOutOfMemory(p.load, f"{exc}{nxt}") from exc
            if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
                raise BackendOutOfMemory(p.load, str(exc).splitlines()[0]) from exc
            if isinstance(exc, TimeoutError):
                raise LoadFailed(
                    p.load, f"did not finish within load_timeout_s={self.config.load_timeout_s:g}"
                ) from exc
            if isinstance(exc, Exception) and not isinstance(exc, BackendError):
                raise LoadFailed(p.load, f"{type(exc).__name__}: {exc}") from exc
            raise
        self._ledger = self._ledger.finish_load()
        if p.from_tier is Tier.HOST:
            self._restores += 1
        else:
            self._loads += 1
        self._emit(
            "load",
            model=p.load,
            duration_s=self.now_s() - t0,
            detail=f"from {p.from_tier.value}",
            bytes_after=resident.vram_bytes,  # what the ledger holds for it
        )
        self._learn(p.load, backend.measured_bytes(live_only=True), "load")
        self._start_watch(p.load)

    def _back_off(self, model: str, exc: Exception) -> tuple[int, float]:
        """Count a failure in a row, record it, and hold the model back: the back-off doubles
        with each failure in a row, up to a quarter of max_wait_s."""
        n = self._failures.get(model, 0) + 1
        self._failures[model] = n
        self._last_error[model] = exc
        backoff = min(self.config.retry_backoff_s * 2 ** (n - 1), self.config.max_wait_s / 4)
        self._backoff_until[model] = self.now_s() + backoff
        return n, backoff

    def _record_failure(self, model: str, exc: Exception) -> None:
        n, backoff = self._back_off(model, exc)
        logger.warning("switch to %s failed (%d in a row; retry in %.2f s): %s", model, n, backoff, exc)
        self._emit("fail", model=model, detail=str(exc))
        # The waiters of the target get the error (not the ones that come later).
        for w in [w for w in self._waiters if w.model == model]:
            self._fail_waiter(w, exc)
