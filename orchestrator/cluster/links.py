"""The router's side of each machine of a cluster: its snapshots and faults, and the
releases and renewals of the leases the router holds there (see ``client.py``).

``ClusterOrchestrator`` routes and opens leases; ``Links`` keeps what it knows of each
machine up to date (a task per machine follows its snapshots, another renews its leases) and
carries each ended lease's release: at the next turn of the event loop, or with the next
request to that machine, its answer taken by a task of the router.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
from anyio.abc import TaskGroup

from orchestrator.cluster.machines import (
    RELEASE_TIMEOUT_S,
    ClusterLease,
    Held,
    MachineLink,
    first_line,
    ray_module,
)
from orchestrator.cluster.snapshot import MachineSnapshot

logger = logging.getLogger("orchestrator.cluster")

RENEW_FRACTION = 1 / 3  # renew a lease when this much of its ttl has passed
DOWN_RETRY_S = 0.5  # how often a machine whose actor is gone for good is looked at again


class Links:
    """The machines of one router, as that router knows them (see the module docstring).

    :param ttl_s: the router's lease ttl (renewals look at least this often).
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.machines: dict[str, MachineLink] = {}
        self.tg: TaskGroup | None = None  # the router's, while it runs
        # (made by a waiter, set and dropped at the next change: none made while nobody waits)
        self._changed: anyio.Event | None = None
        self._answered: anyio.Event | None = None  # at each release's answer

    def machine(self, node: str) -> MachineLink:
        m = self.machines.get(node)
        if m is None:
            raise ValueError(f"no machine {node!r} in this cluster; its machines: {', '.join(self.machines)}")
        return m

    async def changed(self) -> None:
        """Return at the next change of the views: of any machine (a snapshot, a machine
        down), or of this router's requests (one sent, granted, released)."""
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    async def released(self, node: str | None = None) -> None:
        """Return once each release this router has sent (to machine ``node``, or to any) is
        answered, or given up on after ``RELEASE_TIMEOUT_S`` (the block that ended it does not
        wait for that answer)."""
        machines = [self.machine(node)] if node is not None else list(self.machines.values())
        for m in machines:
            if m.unsent or m.carried:
                self.flush(m, carried=True)
        while any(m.releasing for m in machines):
            if self._answered is None:
                self._answered = anyio.Event()
            await self._answered.wait()

    def notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    # -- snapshots and faults ----------------------------------------------------------------

    async def poll(self, m: MachineLink) -> None:
        ray = ray_module()
        version, instance = -1, None
        while True:
            try:
                snap: MachineSnapshot = await m.handle.snapshot_after.remote(version, instance)
            except ray.exceptions.RayActorError as exc:
                if m.snapshot is None and isinstance(exc, ray.exceptions.ActorDiedError):
                    m.start_failed = True  # it never started: its config, or its constructor
                    self.down(m, f"its orchestrator's actor could not start: {first_line(exc)}")
                else:
                    self.down(m, f"its orchestrator's actor died ({type(exc).__name__})")
                version, instance = -1, None
                if isinstance(exc, ray.exceptions.ActorDiedError):
                    await anyio.sleep(DOWN_RETRY_S)  # gone for good, or not restartable yet
                continue
            except Exception as exc:  # its orchestrator failed to start (a RayTaskError), or worse
                cause = getattr(exc, "cause", None)
                if m.snapshot is None:
                    m.start_failed = True
                self.down(m, str(cause) if cause is not None else first_line(exc))
                await anyio.sleep(DOWN_RETRY_S)
                continue
            if m.instance is not None and snap.instance != m.instance:
                m.changes.clear()  # counted against the versions of the orchestrator that is gone
                self.lose_all(m, f"machine {m.name}'s orchestrator restarted (instance {snap.instance})")
                m.snapshot = None
                # (releases of its leases: they ended with it; the answers still coming are moot)
                m.releasing.clear()
                m.unsent.clear()
                m.carried.clear()
                self.answer()
            if not m.alive:
                logger.info("machine %s is up (instance %s)", m.name, snap.instance)
            m.alive, m.down_reason = True, ""
            self.apply(m, snap)
            version, instance = snap.version, snap.instance

    def apply(self, m: MachineLink, snap: MachineSnapshot) -> None:
        """Take a snapshot of a live machine's present instance (from its poll, or with a
        grant), unless the one taken is as new (``MachineSnapshot.newer_than``)."""
        old = m.snapshot
        if old is not None and old.instance == snap.instance and not snap.newer_than(old):
            return
        m.instance, m.snapshot = snap.instance, snap
        for held in list(m.leases.values()):
            if held.lost is None and held.version < snap.version and held.lease.id not in snap.lease_ids:
                held.ask_why = True
                what = held.lease.model or "its reservation"
                self.lose(held, f"machine {m.name} ended the lease on {what}")
        self.notify()

    def down(self, m: MachineLink, why: str) -> None:
        if m.alive:
            logger.warning("machine %s is down: %s", m.name, why)
        m.alive, m.down_reason = False, why
        m.changes.clear()
        self.lose_all(m, f"machine {m.name} went down: {why}")
        self.notify()

    def lose_all(self, m: MachineLink, why: str) -> None:
        for held in list(m.leases.values()):
            self.lose(held, why)

    def lose(self, held: Held, why: str) -> None:
        if held.lost is None:
            held.lost = why
            if held.scope is not None:
                held.scope.cancel()

    def release(self, m: MachineLink, lease: ClusterLease, granted: int) -> None:
        """Release a lease whose block has ended: at the next turn of the event loop, or
        carried by the next request to that machine if one is sent before (a task that
        acquires again at once makes one call, not two). Its answer is not awaited here."""
        if self.tg is None:  # the router has closed: nothing would take the answer
            m.unsent[lease.id] = None
            self.flush(m)
            return
        m.releasing[lease.id] = (lease.model, granted)
        m.unsent[lease.id] = None
        self.notify()
        if not m.flush_soon:
            m.flush_soon = True
            asyncio.get_running_loop().call_soon(self.flush, m)

    def flush(self, m: MachineLink, carried: bool = False) -> None:
        """Send its own release call for each release not sent yet (``carried``: also for
        those a request carries, whose answer may be long in coming)."""
        m.flush_soon = False
        ids = list(m.unsent)
        m.unsent.clear()
        if carried:
            ids += list(m.carried)
            m.carried.clear()
        tg = self.tg
        for lease_id in ids:
            try:
                ref = m.handle.release.remote(lease_id)
            except Exception as exc:  # (Ray shut down under the router): it expires there
                logger.warning("machine %s: the release of %s was not sent: %s", m.name, lease_id, exc)
                ref = None
            if tg is None or ref is None:
                m.releasing.pop(lease_id, None)
                continue
            tg.start_soon(self._release_answer, m, lease_id, m.releasing.get(lease_id, ("", 0))[0], ref)
        if ids:
            self.answer()

    def answer(self) -> None:
        answered, self._answered = self._answered, None
        if answered is not None:
            answered.set()
        self.notify()

    def carried_answered(self, m: MachineLink, rid: str) -> None:
        """The request ``rid`` has answered (or cannot: its machine is down) for the releases
        it alone carried."""
        done = [lease_id for lease_id, by in m.carried.items() if by == rid]
        for lease_id in done:
            del m.carried[lease_id]
            m.releasing.pop(lease_id, None)
        if done:
            self.answer()

    def carried_unanswered(self, m: MachineLink, rid: str) -> None:
        """The request ``rid`` was cancelled here: its answer will not be read, so the releases
        it alone carried get their own calls (done already there, they answer that)."""
        for lease_id in [lease_id for lease_id, by in m.carried.items() if by == rid]:
            del m.carried[lease_id]
            m.unsent[lease_id] = None
        if m.unsent and not m.flush_soon:
            m.flush_soon = True
            asyncio.get_running_loop().call_soon(self.flush, m)

    async def _release_answer(self, m: MachineLink, lease_id: str, key: str, ref: Any) -> None:
        ray = ray_module()
        try:
            with anyio.move_on_after(RELEASE_TIMEOUT_S):
                why, version = await ref
                if why is None:
                    m.changes.append((int(version), key, -1))
        except ray.exceptions.RayActorError:
            pass  # the machine went down: its leases ended with it
        except Exception as exc:  # its orchestrator failed (a RayTaskError): so did the lease
            logger.warning("machine %s: the release of %s failed: %s", m.name, lease_id, first_line(exc))
        finally:
            m.releasing.pop(lease_id, None)
            self.answer()

    async def renewals(self, m: MachineLink) -> None:
        """Renew this router's leases on machine ``m``: each is renewed a sixth to a third of
        its ttl after its grant or last renewal, every lease that is due in one call."""
        ray = ray_module()
        while True:
            ttl_s = min([self.ttl_s] + [h.lease.ttl_s for h in m.leases.values()])
            await anyio.sleep(ttl_s * RENEW_FRACTION / 2)
            now = anyio.current_time()
            due = [
                h
                for h in m.leases.values()
                if h.lost is None and now - h.renewed_at >= h.lease.ttl_s * RENEW_FRACTION / 2
            ]
            if not due:
                continue
            try:
                ended: dict[str, str] = await m.handle.renew_all.remote(tuple(h.lease.id for h in due))
            except ray.exceptions.RayActorError as exc:
                self.down(m, f"its orchestrator's actor died ({type(exc).__name__})")
                continue
            except Exception as exc:  # its orchestrator failed (a RayTaskError)
                logger.warning("machine %s: renewing its leases failed: %s", m.name, first_line(exc))
                continue
            for h in due:
                h.renewed_at = now
                why = ended.get(h.lease.id)
                if why is not None:
                    self.lose(h, why if why.startswith(f"machine {m.name}") else f"machine {m.name}: {why}")
