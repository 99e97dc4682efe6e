"""The property-test machine on one card (see ``orchestrator.testing``)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import anyio
import anyio.from_thread
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from orchestrator.config import Config, SimSpec
from orchestrator.device.simulated import SimulatedDevice, SimulatedOOM
from orchestrator.errors import (
    AcquireTimeout,
    BackendError,
    InsufficientVRAM,
    LeaseDeadlock,
    NotRunning,
)
from orchestrator.events import Event
from orchestrator.runtime import Orchestrator
from states.machine import State, active_state
from states.units import format_gib

#: Errors a client may legitimately get back (everything else fails the test).
EXPECTED_ERRORS = (AcquireTimeout, BackendError, LeaseDeadlock, NotRunning, InsufficientVRAM)


def scaled(config: Config, time_scale: float, *, footprint_factor: float = 1.0) -> Config:
    """The same config on a faster clock (every latency and timeout times ``time_scale``),
    with each model's true footprint ``footprint_factor`` times its estimate."""
    factor = time_scale / config.time_scale if config.time_scale else time_scale
    models = {}
    for name, spec in config.models.items():
        sim = spec.sim or SimSpec(0, 0, 0, 0, spec.vram_bytes)
        true = int(spec.vram_bytes * footprint_factor) if footprint_factor != 1.0 else sim.true_vram_bytes
        models[name] = dataclasses.replace(spec, sim=dataclasses.replace(sim, true_vram_bytes=true))
    return dataclasses.replace(
        config,
        device="simulated",
        models=models,
        time_scale=time_scale,
        fairness_s=config.fairness_s * factor,
        max_wait_s=config.max_wait_s * factor,
        load_timeout_s=config.load_timeout_s * factor,
        unload_timeout_s=config.unload_timeout_s * factor,
        retry_backoff_s=config.retry_backoff_s * factor,
    )


@dataclasses.dataclass(frozen=True)
class Unusable:
    """A model that can never be loaded within the budget (at a footprint factor)."""

    model: str
    true_bytes: int  # what it really takes on the simulated device
    planned_bytes: int | None  # what the orchestrator plans it at once learned; None: never learned

    def describe(self) -> str:
        if self.planned_bytes is None:
            return f"{self.model} (takes {format_gib(self.true_bytes)}, over its estimate, with learning off)"
        return f"{self.model} (needs {format_gib(self.planned_bytes)})"


def unusable_models(config: Config, *, footprint_factor: float = 1.0) -> list[Unusable]:
    """The models that can never be loaded when each really takes ``footprint_factor`` times
    its estimate (or its ``simulation`` true size): an ``acquire()`` of one fails with
    ``InsufficientVRAM`` once its true size is learned, or (with ``monitor.learn_footprints``
    off) every load of it fails within its reservation. This holds whatever the sequence of
    requests, so ``check`` reports it apart from whether the budget held."""
    if footprint_factor <= 0 or not math.isfinite(footprint_factor):
        raise ValueError(f"footprint_factor must be a positive number, got {footprint_factor!r}")
    cfg = scaled(config, config.time_scale or 1.0, footprint_factor=footprint_factor)
    out = []
    for name, spec in sorted(cfg.models.items()):
        true = spec.sim.true_vram_bytes if spec.sim is not None else spec.vram_bytes
        if true <= spec.vram_bytes:
            continue  # loads within its reservation, which the config already fits in the budget
        if not cfg.learn_footprints:
            out.append(Unusable(name, true, None))
            continue
        # As monitor.planning_estimate plans a model it has measured larger than configured.
        planned = math.ceil(true * (1 + cfg.footprint_margin))
        if planned > cfg.budget_bytes:
            out.append(Unusable(name, true, planned))
    return out


@contextlib.contextmanager
def quiet_expected_failures() -> Iterator[None]:
    """Silence the orchestrator's own log while the harness runs: the faults it injects (failed
    loads, out-of-memory loads of the wrong estimates) are logged as errors by the orchestrator,
    and a user reading ``check``'s output would take them for failures of the check."""
    log = logging.getLogger("orchestrator")
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(level)


class InvariantViolation(AssertionError):
    pass


@dataclasses.dataclass
class _Client:
    id: int
    model: str
    phase: str = "starting"  # starting -> waiting -> holding -> done
    outcome: str = ""
    ahead: int = 0  # clients of the same model not yet done when this one started
    waited_s: float | None = None  # the lease's wait, once served
    scope: anyio.CancelScope | None = None
    future: Future[None] | None = None


class OrchestratorMachine(RuleBasedStateMachine):
    """Extend it (add rules) or parametrize it with ``machine_for(config)``."""

    config: Config  # set by machine_for()
    time_scale = 0.0005  # the 20 s LLM start of the embedded config takes 10 ms
    footprint_factor = 1.0
    client_limit = 24
    max_hold_s = 30.0  # the longest a client holds a lease (simulated seconds)
    check_wait_bound = False  # check every served client against wait_bound_s (no faults)

    def __init__(self) -> None:
        super().__init__()
        self.clients: dict[int, _Client] = {}
        self.next_id = 0
        self.violations: list[str] = []
        self.foreign_pids: list[int] = []
        self.measured: set[str] = set()  # models whose load was measured (see _check_learned)
        self.held: dict[str, int] = {}  # leases per model, counted from the events alone

    # -- setup and teardown ----------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        self.cfg = scaled(self.config, self.time_scale, footprint_factor=self.footprint_factor)
        self.device = SimulatedDevice(self.cfg.total_bytes)
        self.orch = self.make_orchestrator(self.cfg, self.device)
        self.orch.add_listener(self._on_event)
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self._orch_cm = self.portal.wrap_async_context_manager(self.orch)
        self._orch_cm.__enter__()

    def make_orchestrator(self, config: Config, device: SimulatedDevice) -> Orchestrator:
        """Override to test your own backends (they must allocate on ``device``)."""
        return Orchestrator(config, device=device)

    def teardown(self) -> None:
        if not hasattr(self, "portal"):
            return
        try:
            # Let every client finish: leases are bounded, so all must end.
            # Foreign processes exit first: a request they block would otherwise wait forever.
            # Faults stop: the shutdown's own unload failures are tested elsewhere.
            self.portal.call(self._release_foreign)
            self.portal.call(self._clear_faults)
            bound_s = self._quiesce_bound_s()
            deadline_ok = self.portal.call(self._wait_clients, bound_s)
            stuck = [c for c in self.clients.values() if c.phase != "done"]
            snapshot = (
                f"state {self.orch.state.name}, {self.orch.ledger().describe()}, "
                f"queue {self.orch.waiting()}, leases {dict(self.orch.leases())}"
            )
            self._orch_cm.__exit__(None, None, None)
            if not deadline_ok:
                raise InvariantViolation(
                    f"{len(stuck)} clients never finished within {bound_s:.2f} s (starved or hung): "
                    + ", ".join(f"#{c.id} {c.model} {c.phase}" for c in stuck[:5])
                    + f"; {snapshot}"
                )
            left = left_on(self.device, 2 * self.cfg.unload_timeout_s)
            if left:
                raise InvariantViolation(f"memory left on the device after shutdown: {left}")
            if self.orch.state is not State.IDLE:
                raise InvariantViolation(f"state after shutdown is {self.orch.state.name}, not IDLE")
            self._check_learned()
            if self.check_wait_bound:
                self._check_waits()
            if self.violations:
                raise InvariantViolation(self.violations[0])
        finally:
            self._portal_cm.__exit__(None, None, None)

    def _check_learned(self) -> None:
        """Every model the orchestrator tried to load is known at its true size at least
        (when it is larger than its estimate): it noticed the difference and learned it."""
        if not self.cfg.learn_footprints:
            return
        # Only models whose load was measured: one that finished, or one the device refused for
        # its size. A switch may fail before its load (an eviction that fails, foreign memory
        # that appears), and an injected fault cuts a load short before anything is measured.
        for name in sorted(self.measured):
            sim = self.cfg.models[name].sim
            true = sim.true_vram_bytes if sim is not None else 0
            if true <= self.cfg.models[name].vram_bytes:
                continue
            fp = self.orch.footprints.get(name)
            if fp is None or fp.high_water_bytes < true:
                raise InvariantViolation(
                    f"{name} really takes {format_gib(true)} but the orchestrator learned "
                    f"{format_gib(fp.high_water_bytes) if fp else 'nothing'}"
                )

    def wait_bound_s(self, c: _Client) -> float:
        """How long a client may wait at most: ``max_wait_s``, then (once it is overdue and
        ranked first) for each model a switch and the end of a lease in progress, then its
        turn among those of its model ahead of it, ``max_concurrent`` at a time; plus a
        second of slack for the test machine's scheduling."""
        sims = [s.sim for s in self.cfg.models.values() if s.sim is not None]
        switch_s = max((s.load_s + s.unload_s for s in sims), default=0.0) * self.cfg.time_scale
        hold_s = self.max_hold_s * self.cfg.time_scale
        cap = self.cfg.models[self.orch.resolve(c.model).name].max_concurrent or max(1, c.ahead)
        turns = math.ceil(c.ahead / cap)
        return self.cfg.max_wait_s + len(self.cfg.models) * (switch_s + hold_s) + turns * hold_s + 1.0

    def _check_waits(self) -> None:
        for c in self.clients.values():
            if c.waited_s is not None and c.waited_s > self.wait_bound_s(c):
                self.violations.append(
                    f"client #{c.id} ({c.model}) waited {c.waited_s:.3f} s, past its bound "
                    f"{self.wait_bound_s(c):.3f} s (max_wait_s {self.cfg.max_wait_s:g} s, {c.ahead} ahead)"
                )

    def _quiesce_bound_s(self) -> float:
        sims = [s.sim for s in self.cfg.models.values() if s.sim is not None]
        switch_s = max((s.load_s + s.unload_s for s in sims), default=0.0) * self.cfg.time_scale
        per_client = self.cfg.max_wait_s + 4 * (
            switch_s + self.cfg.load_timeout_s + self.cfg.unload_timeout_s
        )
        return 2.0 + per_client * max(1, len(self.clients)) / 4

    async def _wait_clients(self, bound_s: float) -> bool:
        with anyio.move_on_after(bound_s):
            while any(c.phase != "done" for c in self.clients.values()):  # noqa: ASYNC110
                await anyio.sleep(0.001)
            return True
        return False

    async def _clear_faults(self) -> None:
        for b in self.orch.backends.values():
            faults = getattr(b, "faults", None)
            if faults is not None:
                faults.fail_loads = faults.hang_loads = faults.fail_unloads = 0

    async def _release_foreign(self) -> None:
        for pid in self.foreign_pids:
            self.device.release_foreign(pid)
        self.foreign_pids.clear()

    # -- the checks ------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        model = event.model
        if event.kind in ("grant", "release") and model is not None and model in self.cfg.models:
            self.held[model] = self.held.get(model, 0) + (1 if event.kind == "grant" else -1)
            cap = self.cfg.models[model].max_concurrent
            if cap is not None and self.held[model] > cap:
                self.violations.append(
                    f"{model} holds {self.held[model]} leases at once; max_concurrent is {cap}"
                )
        if event.model is not None and (
            event.kind == "load" or (event.kind == "fail" and "out of memory" in (event.detail or ""))
        ):
            self.measured.add(event.model)
        where = f"at event {event.kind} {event.trigger or ''} {event.model or ''}"
        self._check_budget(where)
        if event.kind == "transition" and event.trigger == "begin_switch" and event.model is not None:
            # A load begins only when the plan fits the budget less what others hold now.
            room = self.cfg.budget_bytes - self.orch.ledger().foreign_bytes
            if (event.bytes_after or 0) > room:
                self.violations.append(
                    f"{where}: the plan commits {format_gib(event.bytes_after or 0)} but only "
                    f"{format_gib(room)} of the budget is not held by other processes"
                )

    def _check_budget(self, where: str) -> None:
        ledger = self.orch.ledger()
        budget = self.cfg.budget_bytes
        if ledger.committed_bytes > budget:
            self.violations.append(
                f"{where}: committed {format_gib(ledger.committed_bytes)} > budget {format_gib(budget)}"
            )
        peak = self.device.peak_owned_bytes
        if peak > budget:
            self.violations.append(f"{where}: device peak {format_gib(peak)} > budget {format_gib(budget)}")

    def _accounting(self) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
        """The shadow queue (what the clients say: per model, how many wait and hold) and
        what the orchestrator says, to be compared."""
        shadow: dict[str, tuple[int, int]] = {}
        for c in self.clients.values():
            if c.phase in ("waiting", "holding"):
                name = self.orch.resolve(c.model).name
                waiting, holding = shadow.get(name, (0, 0))
                shadow[name] = (waiting + 1, holding) if c.phase == "waiting" else (waiting, holding + 1)
        real: dict[str, tuple[int, int]] = {}
        for name, _, _ in self.orch.waiting():
            waiting, holding = real.get(name, (0, 0))
            real[name] = (waiting + 1, holding)
        for name, n in self.orch.leases().items():
            waiting, holding = real.get(name, (0, 0))
            real[name] = (waiting, holding + n)
        return shadow, real

    async def _check_all(self) -> None:
        self._check_budget("after a step")
        if self.orch.state is not State.SWITCHING and self.orch.state is not active_state(self.orch.ledger()):
            self.violations.append(
                f"state {self.orch.state.name} does not match the ledger ({self.orch.ledger().describe()})"
            )
        # A waiter that was just failed (or granted) is out of the queue before its task runs
        # again; a lost lease or waiter stays lost. So let the tasks run a little, then compare.
        for _ in range(50):
            shadow, real = self._accounting()
            if shadow == real:
                return
            await anyio.sleep(0.001)
        self.violations.append(
            f"the clients wait and hold (per model: waiting, holding) {shadow}, but the orchestrator "
            f"has {real} (leases {dict(self.orch.leases())}, queue {self.orch.waiting()})"
        )

    @invariant()
    def invariants_hold(self) -> None:
        # Violations are collected here and at every event, and raised at teardown: raising
        # from the step where a background task happened to notice would make the number of
        # steps vary between replays of one sequence, which hypothesis cannot shrink.
        if hasattr(self, "portal"):
            self.portal.call(self._check_sync)

    async def _check_sync(self) -> None:
        await self._check_all()

    # -- clients ---------------------------------------------------------------------------

    async def _client(self, c: _Client, hold_s: float, timeout_s: float | None, priority: int) -> None:
        with anyio.CancelScope() as scope:
            c.scope = scope
            try:
                c.phase = "waiting"  # acquire() queues before its first await: no gap
                async with self.orch.acquire(c.model, timeout=timeout_s, priority=priority) as lease:
                    c.phase = "holding"
                    c.waited_s = lease.waited_s
                    if lease.handle is None:
                        self.violations.append(f"client #{c.id} got a lease on {c.model} without a handle")
                    if not self.orch.ledger().on_gpu(lease.model):
                        self.violations.append(f"client #{c.id} holds {lease.model} but it is not on the GPU")
                    await anyio.sleep(hold_s)
                c.outcome = "served"
            except EXPECTED_ERRORS as exc:
                c.outcome = type(exc).__name__
            except Exception as exc:
                c.outcome = f"unexpected {type(exc).__name__}: {exc}"
                self.violations.append(f"client #{c.id} ({c.model}) got an unexpected error: {exc!r}")
            finally:
                c.phase = "done"
        if scope.cancelled_caught:
            c.outcome = "cancelled"

    def _start_client(self, model: str, hold: float, timeout: float | None, priority: int) -> None:
        c = _Client(self.next_id, model)
        name = self.orch.resolve(model).name
        c.ahead = sum(
            1 for x in self.clients.values() if x.phase != "done" and self.orch.resolve(x.model).name == name
        )
        self.next_id += 1
        self.clients[c.id] = c
        unit = self.cfg.time_scale
        c.future = self.portal.start_task_soon(
            self._client, c, hold * unit, None if timeout is None else timeout * unit, priority
        )

    # -- rules -----------------------------------------------------------------------------

    def _models(self) -> list[str]:
        return sorted(self.config.models)

    @rule(data=st.data())
    @precondition(lambda self: len(self.clients) < self.client_limit)
    def acquire(self, data: st.DataObject) -> None:
        """A client asks for a model (or a kind) and holds it for a while (simulated seconds)."""
        names = self._models() + sorted(self.config.defaults)
        model = data.draw(st.sampled_from(names), label="model")
        hold = data.draw(st.floats(0, self.max_hold_s), label="hold_s")
        timeout = data.draw(st.none() | st.floats(1, 200), label="timeout_s")
        priority = data.draw(st.integers(0, 2), label="priority")
        self._start_client(model, hold, timeout, priority)

    # Draws and preconditions depend only on earlier draws, never on timing (hypothesis
    # replays a sequence and needs the same choices): a cancel picks any client by number
    # and does nothing if that client has already finished.
    @rule(data=st.data())
    @precondition(lambda self: bool(self.clients))
    def cancel(self, data: st.DataObject) -> None:
        """Cancel a client that is waiting or holding."""
        c = self.clients[data.draw(st.integers(0, len(self.clients) - 1), label="client")]
        self.portal.call(self._cancel, c)

    async def _cancel(self, c: _Client) -> None:
        if c.scope is not None and c.phase != "done":
            c.scope.cancel()

    @rule(seconds=st.floats(0, 40))
    def advance(self, seconds: float) -> None:
        """Let simulated time pass."""
        self.portal.call(anyio.sleep, seconds * self.cfg.time_scale)

    @rule(data=st.data())
    def inject_fault(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self._models()), label="model")
        backend: Any = self.orch.backends[name]
        fault = data.draw(
            st.sampled_from(["fail_load", "hang_load", "fail_unload", "slow_release"]), label="fault"
        )
        apply: Callable[[], None]
        if fault == "fail_load":

            def apply() -> None:
                backend.faults.fail_loads += 1
        elif fault == "hang_load":

            def apply() -> None:
                backend.faults.hang_loads += 1
        elif fault == "fail_unload":

            def apply() -> None:
                backend.faults.fail_unloads += 1
        else:
            slow = data.draw(st.floats(0, 2 * self.config.unload_timeout_s), label="slow_release_s")

            def apply() -> None:
                backend.faults.slow_release_s = slow

        self.portal.call(self._run_sync, apply)

    async def _run_sync(self, fn: Callable[[], None]) -> None:
        fn()

    @rule(gib=st.floats(0.5, 6))
    @precondition(lambda self: len(self.foreign_pids) < 2)
    def foreign_process_takes_memory(self, gib: float) -> None:
        pid = 10_000 + self.next_id + 100 * len(self.foreign_pids)
        self.foreign_pids.append(pid)  # even if it fails: the pid's release is then a no-op

        def take() -> None:
            try:
                self.device.take_foreign(pid, int(gib * 2**30))
            except SimulatedOOM:
                pass  # there was no room: the other process failed, not us

        self.portal.call(self._run_sync, take)

    @rule()
    @precondition(lambda self: bool(self.foreign_pids))
    def foreign_process_exits(self) -> None:
        pid = self.foreign_pids.pop(0)

        def release() -> None:
            self.device.release_foreign(pid)

        self.portal.call(self._run_sync, release)


def left_on(device: SimulatedDevice, release_s: float) -> dict[str, int]:
    """What our models still hold on ``device`` after the shutdown (foreign processes aside).

    A slow release (an injected fault: the driver gives the memory back later) may outlast the
    shutdown's own wait, which then reports it; such memory is on its way back, and is waited
    for here up to ``release_s``. Memory still held after that was never freed: a leak."""
    deadline = time.monotonic() + release_s

    def ours() -> dict[str, int]:
        return {o: n for o, n in device.holders().items() if not o.startswith("foreign:")}

    while any(device.held_by(o, live_only=True) < n for o, n in ours().items()):
        if time.monotonic() > deadline:
            break
        time.sleep(0.001)
    return ours()
