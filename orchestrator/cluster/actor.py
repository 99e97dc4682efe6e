"""``OrchestratorActor``: one machine's ``Orchestrator``, hosted in a Ray actor.

The actor is an async actor: Ray runs its methods on one asyncio event loop, in which the
orchestrator runs for the actor's life (started by the first call, in a task of its own that
holds the ``async with``). Leases are the daemon's remote leases (``LeaseManager``): each is
held in a task of the actor until released, expired (not renewed within its ttl), cancelled,
or ended by the machine (its model crashed); the holder named in each request is the owner
for the deadlock check, so that two leases of one task on one machine are one holder's.

Snapshots go to the routers by long poll: ``snapshot_after(version)`` answers soon after the
orchestrator's events have moved past ``version`` (each event is a change: a grant, a
release, a load, an eviction), at most one snapshot every ``SNAPSHOT_INTERVAL_S`` while
changes stream in. The router always has one such call waiting, so a change reaches it in
one message, and a dead actor is noticed when that call fails.

The lease calls are the hot path: ``open(request)`` takes one tuple (Ray serialises each
argument of a call on its own, at a cost per argument) and answers once the lease is
granted; it first releases the leases the router has released but not yet heard back about
(``LeaseRequest.release_first``), so that a holder's next request never finds its last lease
still held. Events are kept as they are and turned into dicts only when read.

The class is plain Python; ``orchestrator.cluster.client`` wraps it with ``ray.remote`` and
the machine's resources. Nothing here moves model weights: each machine loads its own.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from orchestrator.cluster.snapshot import MachineSnapshot, snapshot_of
from orchestrator.cluster.wire import to_wire
from orchestrator.config import Config, load_config, parse_config
from orchestrator.daemon.errors import LeaseGone
from orchestrator.daemon.leases import LEASE_ID, LeaseManager, RemoteLease
from orchestrator.events import Event
from orchestrator.runtime import Orchestrator

logger = logging.getLogger("orchestrator.cluster")

EVENTS_KEPT = 100_000  # events the actor keeps for events_after()
SNAPSHOT_COALESCE_S = 0.01  # after a change, wait this long for more before answering a poll
SNAPSHOT_INTERVAL_S = 0.05  # and answer polls at most this often (a snapshot costs both sides CPU)
LOOPBACK = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
# events the router accounts for itself (its own grants and releases): a grant after any other
# (a load, an eviction) brings the machine's snapshot with it
QUIET_EVENTS = frozenset({"grant", "release"})


class LeaseRequest(NamedTuple):
    """What ``OrchestratorActor.open`` is sent, as one plain tuple (``tuple(request)``)."""

    request_id: str
    model: str | None  # None: a reservation of n_bytes
    n_bytes: int | None
    priority: int
    timeout_s: float | None
    ttl_s: float
    holder: str
    pid: int | None = None
    release_first: tuple[str, ...] = ()  # leases the router has released, their answer not back yet


def machine_resource(node: str) -> str:
    """The custom Ray resource that marks a machine (``ray start --resources``)."""
    return f"vram-machine:{node}"


class OrchestratorActor:
    """One machine's orchestrator (see the module docstring).

    :param node: the machine's name in the cluster.
    :param config_path: its config file, read on the machine (each machine has its own).
    :param config_text: or the config as YAML text (tests and one-off clusters).
    """

    def __init__(self, node: str, config_path: str | None = None, config_text: str | None = None) -> None:
        if (config_path is None) == (config_text is None):
            raise ValueError("give the machine's config_path or its config_text (one of the two)")
        self.node = node
        # A config error is kept and reported by every call (a constructor that raises would
        # be restarted by Ray again and again, and this error's class does not cross to the
        # caller as itself).
        self.config_error: str | None = None
        try:
            self.config: Config = (
                load_config(config_path)
                if config_path is not None
                else parse_config(config_text or "", source=f"<config of machine {node}>")
            )
        except Exception as exc:
            self.config_error = f"{type(exc).__name__}: {exc}"
        self.orch: Orchestrator | None = None
        self.leases: LeaseManager | None = None
        self.version = 0
        self._events: deque[tuple[int, Event]] = deque(maxlen=EVENTS_KEPT)  # (seq, event)
        self._snapshot_at = -math.inf  # monotonic time of the last snapshot built
        self._serial = 0  # snapshots built
        self._moved = False  # an event other than a grant or release since that snapshot
        self._changed = asyncio.Event()
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._host_task: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None
        self._opening: dict[str, asyncio.Task[Any]] = {}
        self._granted: dict[str, str] = {}  # request id -> lease id (for cancel())
        self._request_of: dict[str, str] = {}  # and back
        self._cancelled: set[str] = set()  # request ids cancelled before their open() ran
        self._address, self._ray_node_id = _where()

    # -- life --------------------------------------------------------------------------------

    async def _started(self) -> tuple[Orchestrator, LeaseManager]:
        if self.config_error is not None:
            raise RuntimeError(f"machine {self.node}: its config is not valid: {self.config_error}")
        if self._host_task is None:
            self._host_task = asyncio.get_running_loop().create_task(self._host())
        await self._ready.wait()
        if self._failed is not None:
            raise RuntimeError(f"machine {self.node}: its orchestrator failed to start: {self._failed}")
        assert self.orch is not None and self.leases is not None
        return self.orch, self.leases

    async def _host(self) -> None:
        """The orchestrator's life: entered and left in this one task."""
        try:
            async with Orchestrator(self.config) as orch, LeaseManager(orch, self.config.daemon) as leases:
                self.orch, self.leases = orch, leases
                remove = orch.add_listener(self._on_event)
                self._ready.set()
                try:
                    await self._stop.wait()
                finally:
                    remove()
        except BaseException as exc:
            self._failed = exc
            logger.error("machine %s: its orchestrator stopped: %s", self.node, exc)
        finally:
            self._ready.set()
            self._wake()

    def _on_event(self, e: Event) -> None:
        # (an event is frozen: kept as it is, made a dict only when read)
        self.version += 1
        self._events.append((self.version, e))
        if e.kind not in QUIET_EVENTS:
            self._moved = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()

    async def stop(self) -> dict[str, Any]:
        """Stop the orchestrator (it unloads everything); what its shutdown did."""
        if self._host_task is None:
            return {"unloaded": [], "failed": {}}
        self._stop.set()
        await asyncio.shield(self._host_task)
        report = self.orch.shutdown_report if self.orch is not None else None
        return {
            "unloaded": list(report.unloaded) if report is not None else [],
            "failed": {k: str(v) for k, v in dict(report.failed).items()} if report is not None else {},
        }

    # -- reading -----------------------------------------------------------------------------

    async def snapshot(self) -> MachineSnapshot:
        orch, leases = await self._started()
        return self._snapshot(orch, leases)

    def _snapshot(self, orch: Orchestrator, leases: LeaseManager) -> MachineSnapshot:
        self._snapshot_at = time.monotonic()
        self._moved = False
        self._serial += 1
        return snapshot_of(
            orch,
            node=self.node,
            instance=leases.instance_id,
            version=self.version,
            serial=self._serial,
            lease_ids=frozenset(rl.id for rl in leases.leases() if rl.granted.is_set() and rl.error is None),
            address=self._address,
            ray_node_id=self._ray_node_id,
        )

    async def snapshot_after(self, version: int, instance: str | None) -> MachineSnapshot:
        """The snapshot, soon after it differs from ``version`` of ``instance`` (a long poll):
        ``SNAPSHOT_COALESCE_S`` after the first change (a burst of events: one snapshot), and
        ``SNAPSHOT_INTERVAL_S`` after the last snapshot at the soonest."""
        orch, leases = await self._started()
        while leases.instance_id == instance and self.version <= version and not self._stop.is_set():
            self._changed.clear()
            await self._changed.wait()
            await asyncio.sleep(SNAPSHOT_COALESCE_S)
        wait_s = SNAPSHOT_INTERVAL_S - (time.monotonic() - self._snapshot_at)
        if wait_s > 0 and leases.instance_id == instance and not self._stop.is_set():
            await asyncio.sleep(wait_s)  # (changes that came while the last one travelled)
        return self._snapshot(orch, leases)

    async def events_after(self, seq: int) -> list[dict[str, Any]]:
        """The events after ``seq`` (each event's ``seq`` counts from 1), as dicts."""
        await self._started()
        return [{**e.to_dict(), "node": self.node, "seq": n} for n, e in self._events if n > seq]

    async def statistics(self) -> dict[str, Any]:
        orch, _ = await self._started()
        s = orch.statistics()
        return {
            "switches": s.switches,
            "loads": s.loads,
            "restores": s.restores,
            "evictions": s.evictions,
            "grants": s.grants,
            "releases": s.releases,
            "timeouts": s.timeouts,
            "cancellations": s.cancellations,
            "peak_committed_bytes": s.peak_committed_bytes,
            "budget_bytes": orch.config.budget_bytes,
        }

    async def unload(self, name_or_kind: str, timeout_s: float | None = None) -> dict[str, Any] | None:
        """``Orchestrator.unload`` on this machine: ``None``, or the error (``wire.to_wire``)."""
        orch, _ = await self._started()
        try:
            await orch.unload(name_or_kind, timeout=timeout_s)
        except Exception as exc:
            return to_wire(exc)
        return None

    async def ping(self) -> str:
        _, leases = await self._started()
        return leases.instance_id

    # -- leases ------------------------------------------------------------------------------

    async def open(self, request: Sequence[Any]) -> dict[str, Any]:
        """Release ``release_first``, then wait for a lease (on ``model``, or a reservation of
        ``n_bytes``) and answer it: ``{"lease": ...}`` (with ``"snapshot"`` when anything but
        grants and releases happened since the last snapshot, or a snapshot was built while
        it waited), ``{"error": ...}``
        (``wire.to_wire``) or ``{"cancelled": True}``; each answer with ``"released"``, the
        version after each of ``release_first`` this call released (those already ended
        are not in it).

        :param request: a ``LeaseRequest`` as a plain tuple.
        """
        r = LeaseRequest(*request)
        try:
            _, leases = await self._started()
        except RuntimeError as exc:
            return {"error": to_wire(exc), "released": {}}
        released = await self._release_first(leases, r.release_first)
        asked_serial = self._serial
        if r.request_id in self._cancelled:
            self._cancelled.discard(r.request_id)
            return {"cancelled": True, "released": released}
        task = asyncio.current_task()
        assert task is not None
        self._opening[r.request_id] = task
        owner: Hashable = ("cluster", r.holder)
        try:
            rl = await leases.open(
                model=r.model,
                n_bytes=r.n_bytes,
                priority=r.priority,
                timeout_s=r.timeout_s,
                ttl_s=r.ttl_s,
                pid=r.pid,
                holder=r.holder,
                owner=owner,
            )
        except asyncio.CancelledError:
            return {"cancelled": True, "released": released}
        except Exception as exc:
            return {"error": to_wire(exc), "released": released}
        finally:
            self._opening.pop(r.request_id, None)
        if r.request_id in self._cancelled:  # cancelled in the instant it was granted
            self._cancelled.discard(r.request_id)
            await leases.release(rl.id)
            return {"cancelled": True, "released": released}
        self._granted[r.request_id] = rl.id
        self._request_of[rl.id] = r.request_id
        reply: dict[str, Any] = {"lease": self._lease_dict(rl, r.request_id), "released": released}
        if self._moved or self._serial > asked_serial:
            # A load, an eviction, ... since the last snapshot: the router routes its next
            # request on what this grant did. Or a snapshot was built while this one waited (a
            # move then, or only grants and releases): that snapshot counts this request as a
            # waiter, or (built in the turn between the grant and this call resuming) as a
            # lease without its id, and the router, which may release the lease before that
            # snapshot's successor comes, would go on counting it.
            reply["snapshot"] = self._snapshot(*await self._started())
        return reply

    async def _release_first(self, leases: LeaseManager, lease_ids: Sequence[str]) -> dict[str, int]:
        """Release each lease that is still held; the version after each one released."""
        out: dict[str, int] = {}
        for lease_id in lease_ids:
            self._forget(lease_id)
            try:
                await leases.release(lease_id)
            except LeaseGone:
                continue  # its own release call came first, or it had ended
            out[lease_id] = self.version
        return out

    def _forget(self, lease_id: str) -> None:
        rid = self._request_of.pop(lease_id, None)
        if rid is not None:
            self._granted.pop(rid, None)

    def _lease_dict(self, rl: RemoteLease, request_id: str) -> dict[str, Any]:
        assert self.orch is not None
        gpus = rl.gpus or self.orch.cards().gpus_of(rl.model)
        names = {c.index: c.name for c in self.config.cards}
        backend = self.orch.backends.get(rl.model)
        return {
            "id": rl.id,
            "request_id": request_id,
            "node": self.node,
            "model": rl.model,
            "kind": rl.kind,
            "vram_bytes": rl.vram_bytes,
            "url": _reachable(rl.url, self._address),
            "served_model": backend.served_model if backend is not None else None,
            "ttl_s": rl.ttl_s,
            "waited_s": rl.waited_s,
            "cards": list(gpus),
            "gpu_name": names.get(gpus[0], "") if gpus else "",
            "address": self._address,
            "ray_node_id": self._ray_node_id,
            "version": self.version,
            "expires_in_s": max(0.0, rl.expires_s - time.monotonic()) if rl.expires_s != math.inf else None,
        }

    async def cancel(self, request_id: str) -> None:
        """The router's caller went away: end that request's lease, waiting or granted."""
        task = self._opening.get(request_id)
        lease_id = self._granted.pop(request_id, None)
        if lease_id is not None:
            self._request_of.pop(lease_id, None)
        if task is not None:
            task.cancel()
        elif lease_id is not None:
            await self.release(lease_id)
        else:
            self._cancelled.add(request_id)

    async def renew(self, lease_id: str) -> str | None:
        """Renew a lease: ``None``, or why it has ended."""
        _, leases = await self._started()
        try:
            leases.renew(lease_id)
        except LeaseGone as exc:
            return self._gone(leases, lease_id, exc)
        return None

    async def renew_all(self, lease_ids: Sequence[str]) -> dict[str, str]:
        """Renew each lease: why each one that has ended did (those renewed are not in it)."""
        _, leases = await self._started()
        ended = {}
        for lease_id in lease_ids:
            try:
                leases.renew(lease_id)
            except LeaseGone as exc:
                ended[lease_id] = self._gone(leases, lease_id, exc)
        return ended

    def _gone(self, leases: LeaseManager, lease_id: str, exc: LeaseGone) -> str:
        """Why a lease is gone, in the cluster's words when the actor restarted since."""
        issued = LEASE_ID.fullmatch(lease_id)
        if issued is not None and issued.group(1) != leases.instance_id:
            return (
                f"machine {self.node}'s orchestrator restarted (instance {issued.group(1)}, now "
                f"{leases.instance_id}) and the lease ended with it"
            )
        return exc.message

    async def release(self, lease_id: str) -> tuple[str | None, int]:
        """Release a lease (it is back when this answers): (``None``, or why it had ended;
        the version after the release)."""
        _, leases = await self._started()
        self._forget(lease_id)
        try:
            await leases.release(lease_id)
        except LeaseGone as exc:
            return self._gone(leases, lease_id, exc), self.version
        return None, self.version

    async def ended(self, lease_id: str) -> str | None:
        """Why a lease has ended (``None``: it is held)."""
        _, leases = await self._started()
        try:
            leases.get(lease_id)
        except LeaseGone as exc:
            return self._gone(leases, lease_id, exc)
        return None


def _where() -> tuple[str, str]:
    """This machine's address and Ray node id, when running in Ray."""
    try:
        import ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address()), ray.get_runtime_context().get_node_id()  # type: ignore[no-untyped-call]
    except Exception:
        pass
    return "", ""


def _reachable(url: str | None, address: str) -> str | None:
    """A server's URL as other machines reach it: a loopback host becomes the machine's address
    (the server must then listen on that address, or on all)."""
    if url is None or not address:
        return url
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK:
        return url
    host = f"[{address}]" if ":" in address else address
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
