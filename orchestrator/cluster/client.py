"""``ClusterOrchestrator``: the in-process ``acquire()`` / ``reserve()`` shape, served by the
orchestrators of several machines (one ``OrchestratorActor`` per machine, on Ray).

::

    machines = [Machine("box1", config_path="/etc/vram-orchestrator/config.yaml"), ...]
    async with ClusterOrchestrator(machines, address="auto") as cluster:
        async with cluster.acquire("sdxl") as lease:
            lease.node, lease.card, lease.url      # the machine and card that serve it

Each request is routed by ``states.routing`` over the machines' last snapshots (which each
machine sends when it changes, ``actor.py``), counting the requests this router has sent
since; then it waits for its lease on that machine, in one call that answers at the grant.
The machine holds the lease as the daemon holds a remote lease: renewed from here (all of a
machine's leases that are due in one call, each within a third of its ttl), released when
the block ends, also when the block is cancelled. The block's end sends the release and
does not wait for its answer (a task of the router takes it); the next request to that
machine carries the releases not yet answered, and the machine does them first, so that a
holder never finds its last lease still held there. A release that never arrives (the
router's process ended) is a lease no longer renewed: the machine ends it at its ttl.
``released()`` waits for the answers; ``statistics()``, ``events_of()`` and ``aclose()`` do.
The task's holder identity goes with every request, so the routing keeps a task's second
lease off a machine where it would evict the task's first, and the machine's own deadlock
check sees both.

Faults: a machine whose actor dies is down at once for routing, and every lease it served
ends: the block is cancelled and ``LeaseLost`` raised from it. A request still waiting there
(nothing granted) is routed again to another machine. When Ray restarts the actor
(``max_restarts``), its first snapshot brings the machine back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import uuid
from collections.abc import AsyncIterator, Hashable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import TaskGroup

from orchestrator.cluster.actor import LeaseRequest, OrchestratorActor, machine_resource
from orchestrator.cluster.links import Links
from orchestrator.cluster.machines import (
    RELEASE_TIMEOUT_S,
    ClusterLease,
    Held,
    Machine,
    MachineLink,
    count,
    node_gpus,
    ray_module,
    why_ended_on,
)
from orchestrator.cluster.snapshot import MachineSnapshot
from orchestrator.cluster.wire import ClusterError, from_wire
from orchestrator.daemon.client import LeaseLost
from orchestrator.errors import NotRunning
from states.routing import Choice, MachineView, RouteRequest, route

logger = logging.getLogger("orchestrator.cluster")

DEFAULT_TTL_S = 30.0  # a lease the router stops renewing (its process died) ends this late
HOLD_SMOOTHING = 0.2  # how far one lease moves the learned hold time of its model
MAX_CONCURRENCY = 10_000  # calls an actor runs at once (each waiting lease is one)
NAMESPACE = "vram-orchestrator"


class ClusterOrchestrator:
    """Leases from the orchestrators of several machines (see the module docstring).

    :param machines: the machines, each with its config (a mapping: name -> config path).
    :param address: the Ray cluster to join when Ray is not initialised yet ("auto": the one
        this machine belongs to; ``None``: start a local one).
    :param max_restarts: how often Ray restarts a machine's actor that died (-1: always).
    :param ttl_s: the ttl of each lease (renewed every third of it while held).
    :param stop_machines: on exit, stop each machine's orchestrator (it unloads everything)
        and its actor; ``False`` leaves them running for other routers.
    """

    def __init__(
        self,
        machines: Sequence[Machine] | Mapping[str, str],
        *,
        address: str | None = None,
        namespace: str = NAMESPACE,
        max_restarts: int = -1,
        ttl_s: float = DEFAULT_TTL_S,
        start_timeout_s: float = 120.0,
        stop_machines: bool = True,
    ) -> None:
        if isinstance(machines, Mapping):
            machines = [Machine(name, config_path=str(path)) for name, path in machines.items()]
        self.specs = list(machines)
        names = [m.name for m in self.specs]
        if not names:
            raise ValueError("a cluster needs at least one machine")
        if len(set(names)) != len(names):
            raise ValueError(f"a machine is named twice: {names}")
        if not (isinstance(ttl_s, int | float) and math.isfinite(ttl_s) and ttl_s > 0):
            raise ValueError(f"ttl_s must be a positive number of seconds, got {ttl_s!r}")
        self.address = address
        self.namespace = namespace
        self.max_restarts = max_restarts
        self.ttl_s = float(ttl_s)
        self.start_timeout_s = start_timeout_s
        self.stop_machines = stop_machines
        self._links = Links(self.ttl_s)
        self._machines = self._links.machines  # (the same dict)
        self._tg: TaskGroup | None = None
        self._holders: dict[str, dict[str, dict[str, int]]] = {}  # holder -> node -> model -> leases
        self._hold_s: dict[str, float] = {}  # learned mean hold time per model
        self._holder_prefix = f"{socket.gethostname()}:pid-{os.getpid()}:{uuid.uuid4().hex[:8]}"

    # -- life --------------------------------------------------------------------------------

    async def __aenter__(self) -> ClusterOrchestrator:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "ClusterOrchestrator runs on asyncio (Ray's awaitables are asyncio futures), not on trio"
            ) from None
        ray = ray_module()
        if not ray.is_initialized():
            ray.init(address=self.address, namespace=self.namespace, log_to_driver=False)
        actor_cls = ray.remote(OrchestratorActor)
        for spec in self.specs:
            opts: dict[str, Any] = {
                "name": f"{NAMESPACE}:{spec.name}",
                "namespace": self.namespace,
                "get_if_exists": True,
                "max_restarts": self.max_restarts,
                "max_task_retries": 0,
                "max_concurrency": MAX_CONCURRENCY,
                "num_cpus": 0,
                "num_gpus": spec.num_gpus if spec.num_gpus is not None else node_gpus(ray, spec.name),
                "resources": {machine_resource(spec.name): 0.001},
            }
            handle = actor_cls.options(**opts).remote(
                spec.name, config_path=spec.config_path, config_text=spec.config_text
            )
            self._machines[spec.name] = MachineLink(spec.name, handle)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = self._links.tg = tg
        for m in self._machines.values():
            tg.start_soon(self._links.poll, m, name=f"vram-orchestrator cluster: snapshots of {m.name}")
            tg.start_soon(self._links.renewals, m, name=f"vram-orchestrator cluster: renewals on {m.name}")
        with anyio.move_on_after(self.start_timeout_s):
            while any(m.snapshot is None and not m.start_failed for m in self._machines.values()):
                await self.changed()
        if not any(m.alive for m in self._machines.values()):
            why = "; ".join(f"{m.name}: {m.down_reason}" for m in self._machines.values())
            await self.aclose()
            raise ClusterError(
                f"no machine of the cluster started ({why}); each had {self.start_timeout_s:g} s"
            )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._tg is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_TIMEOUT_S):
            await self.released()  # (their answers come in tasks of the group cancelled next)
        tg, self._tg = self._tg, None
        self._links.tg = None
        if tg is None:
            return
        tg.cancel_scope.cancel()
        await tg.__aexit__(None, None, None)
        if not self.stop_machines:
            return
        ray = ray_module()
        with anyio.CancelScope(shield=True):
            for m in self._machines.values():
                try:
                    with anyio.move_on_after(30.0):
                        await m.handle.stop.remote()
                except ray.exceptions.RayActorError:
                    pass
                ray.kill(m.handle, no_restart=True)

    @property
    def running(self) -> bool:
        return self._tg is not None

    # -- reading -----------------------------------------------------------------------------

    def machines(self) -> dict[str, MachineSnapshot | None]:
        """Each machine's last snapshot (``None``: none came yet)."""
        return {name: m.snapshot for name, m in self._machines.items()}

    def alive(self) -> dict[str, bool]:
        """Whether each machine is up for routing now."""
        return {name: m.alive for name, m in self._machines.items()}

    def views(self) -> list[MachineView]:
        """The routing views of the machines, as the next ``acquire()`` sees them."""
        return [v for m in self._machines.values() if (v := m.view()) is not None]

    def down_reasons(self) -> dict[str, str]:
        return {name: m.down_reason for name, m in self._machines.items() if not m.alive}

    def actor(self, node: str) -> Any:
        """The Ray actor handle of machine ``node`` (for its reads: ``events_after``,
        ``statistics``)."""
        return self._machine(node).handle

    async def changed(self) -> None:
        """Return at the next change of the views: of any machine (a snapshot, a machine
        down), or of this router's requests (one sent, granted, released)."""
        await self._links.changed()

    async def released(self, node: str | None = None) -> None:
        """Return once each release this router has sent (to machine ``node``, or to any) is
        answered, or given up on after ``RELEASE_TIMEOUT_S`` (the block that ended it does not
        wait for that answer)."""
        await self._links.released(node)

    async def events_of(self, node: str, after: int = 0) -> list[dict[str, Any]]:
        """Machine ``node``'s events after ``after`` (each has ``seq`` and ``node``), with the
        releases this router sent there."""
        m = self._machine(node)
        await self.released(node)
        return list(await m.handle.events_after.remote(after))

    async def statistics(self) -> dict[str, dict[str, Any]]:
        """Each live machine's counters (switches, loads, grants, ...), with the releases this
        router sent."""
        ray = ray_module()
        await self.released()
        out = {}
        for name, m in self._machines.items():
            try:
                out[name] = dict(await m.handle.statistics.remote())
            except ray.exceptions.RayActorError:
                continue
        return out

    def _machine(self, node: str) -> MachineLink:
        return self._links.machine(node)

    # -- leases ------------------------------------------------------------------------------

    @asynccontextmanager
    async def acquire(
        self,
        name_or_kind: str,
        *,
        timeout: float | None = None,
        priority: int = 0,
        owner: Hashable | None = None,
        node: str | None = None,
    ) -> AsyncIterator[ClusterLease]:
        """Hold a lease on a model, on the machine routing chooses (``node``: on that one),
        for the block.

        :raises NoRoute: no machine can serve it now (each down, or without the model).
        :raises LeaseLost: the machine ended the lease while the block ran (it died, its
            model crashed); the block was cancelled.
        :raises UnknownModel, InsufficientVRAM, AcquireTimeout, LeaseDeadlock, LoadFailed, ...:
            as ``Orchestrator.acquire()``, from the serving machine.
        """
        if not isinstance(name_or_kind, str) or not name_or_kind:
            raise ValueError(f"acquire() needs a model name or kind, got {name_or_kind!r}")
        async with self._lease(name_or_kind, None, timeout, priority, owner, node, None) as lease:
            yield lease

    @asynccontextmanager
    async def reserve(
        self,
        n_bytes: int,
        *,
        timeout: float | None = None,
        priority: int = 0,
        owner: Hashable | None = None,
        node: str | None = None,
        pid: int | None = None,
    ) -> AsyncIterator[ClusterLease]:
        """Reserve ``n_bytes`` of VRAM on the machine with the cheapest room (``node``: on
        that one) for the block; ``pid`` is a process on that machine whose use is checked."""
        if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes <= 0:
            raise ValueError(f"a reservation needs a positive number of bytes, got {n_bytes!r}")
        async with self._lease("", n_bytes, timeout, priority, owner, node, pid) as lease:
            yield lease

    async def unload(
        self, name_or_kind: str, *, node: str | None = None, timeout: float | None = None
    ) -> None:
        """Unload a model from every live machine that knows it (``node``: from that one), as
        ``Orchestrator.unload`` does on one: once its leases there end; returns when its
        memory is back on each."""
        for m in [self._machine(node)] if node is not None else list(self._machines.values()):
            snap = m.snapshot
            if not m.alive or snap is None or name_or_kind not in snap.names:
                continue
            error = await m.handle.unload.remote(name_or_kind, timeout)
            if error is not None:
                raise from_wire(error, node=m.name)

    def _holder(self, owner: Hashable | None) -> str:
        if owner is None:
            return f"{self._holder_prefix}:task-{anyio.get_current_task().id}"
        return f"{self._holder_prefix}:owner-{owner!r}"

    def _held_by(self, holder: str) -> dict[str, frozenset[str]]:
        return {node: frozenset(models) for node, models in self._holders.get(holder, {}).items()}

    def _note_held(self, holder: str, node: str, model: str, by: int) -> None:
        per_node = self._holders.setdefault(holder, {})
        models = per_node.setdefault(node, {})
        count(models, model, by)
        if not models:
            del per_node[node]
        if not per_node:
            del self._holders[holder]

    @asynccontextmanager
    async def _lease(
        self,
        name: str,
        n_bytes: int | None,
        timeout: float | None,
        priority: int,
        owner: Hashable | None,
        node: str | None,
        pid: int | None,
    ) -> AsyncIterator[ClusterLease]:
        if self._tg is None:
            raise NotRunning()
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds, got {timeout}")
        holder = self._holder(owner)
        lease, m, version = await self._open(name, n_bytes, timeout, priority, holder, node, pid)
        granted_at = anyio.current_time()
        held = Held(lease, version, renewed_at=granted_at)
        m.leases[lease.id] = held
        key = lease.model
        m.changes.append((version, key, 1))
        self._note_held(holder, m.name, key, 1)
        self._links.notify()
        # The block runs in a cancel scope of its own (a loss cancels it), not in a task
        # group: an error of the block comes out as itself, not in an exception group.
        held.scope = scope = anyio.CancelScope()
        try:
            with scope:
                if held.lost is not None:
                    scope.cancel()
                yield lease
        finally:
            m.leases.pop(lease.id, None)
            self._note_held(holder, m.name, key, -1)
            if key:
                self._learn_hold(key, anyio.current_time() - granted_at)
            if held.lost is None:
                self._links.release(m, lease, version)
            elif held.ask_why:
                held.lost = await why_ended_on(m, lease, held.lost)
        if held.lost is not None:
            raise LeaseLost(410, "lease_lost", f"{held.lost}; the block was cancelled: acquire again")

    def _learn_hold(self, model: str, seconds: float) -> None:
        old = self._hold_s.get(model)
        self._hold_s[model] = seconds if old is None else old + HOLD_SMOOTHING * (seconds - old)

    async def _open(
        self,
        name: str,
        n_bytes: int | None,
        timeout: float | None,
        priority: int,
        holder: str,
        node: str | None,
        pid: int | None,
    ) -> tuple[ClusterLease, MachineLink, int]:
        """Route the request and wait for its lease; a machine that dies before the grant is
        left out and the request routed again."""
        ray = ray_module()
        if node is not None:
            self._machine(node)
        started = anyio.current_time()
        skip: set[str] = set()
        while True:
            views = [
                v
                for m in self._machines.values()
                if m.name not in skip and (node is None or m.name == node) and (v := m.view()) is not None
            ]
            request = RouteRequest(
                name, held=self._held_by(holder), hold_s=self._hold_s, external_bytes=n_bytes or 0
            )
            r = route(request, views)
            if r.choice is Choice.DEADLOCK:
                logger.info("%s: every machine would evict a lease of its holder; %s", name, r.describe())
            m = self._machines[r.node]
            remaining = None if timeout is None else max(0.0, timeout - (anyio.current_time() - started))
            rid = uuid.uuid4().hex
            first = dict(m.releasing)  # (all of them: one whose own call is out may come later)
            for lease_id in m.unsent:
                m.carried[lease_id] = rid
            m.unsent.clear()
            asked = LeaseRequest(
                rid, r.model or None, n_bytes, priority, remaining, self.ttl_s, holder, pid, tuple(first)
            )
            count(m.pending, r.model, 1)
            self._links.notify()
            try:
                reply = await m.handle.open.remote(tuple(asked))
            except ray.exceptions.RayActorError as exc:
                self._links.carried_answered(m, rid)  # (the machine's leases ended with it)
                self._links.down(m, f"its orchestrator's actor died ({type(exc).__name__})")
                skip.add(m.name)
                continue
            except BaseException:
                m.handle.cancel.remote(rid)  # cancelled here: end it there (not waited for)
                self._links.carried_unanswered(m, rid)
                raise
            finally:
                count(m.pending, r.model, -1)
            for lease_id, after in dict(reply.get("released") or {}).items():
                m.changes.append((int(after), first[lease_id][0], -1))  # (its own call hears it gone)
                m.releasing.pop(lease_id, None)
                m.carried.pop(lease_id, None)
            self._links.carried_answered(m, rid)
            if first:
                self._links.answer()
            if "lease" in reply:
                snap = reply.get("snapshot")
                if snap is not None and m.alive and snap.instance == m.instance:
                    self._links.apply(m, snap)
                d = reply["lease"]
                return ClusterLease.from_dict(d, r), m, int(d["version"])
            if "cancelled" in reply:  # the machine is stopping
                skip.add(m.name)
                continue
            error = from_wire(reply["error"], node=m.name)
            if isinstance(error, NotRunning):
                skip.add(m.name)
                continue
            raise error
