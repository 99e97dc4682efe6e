"""Remote leases (``/v1/leases``): each is held by a task of its own (the orchestrator's lease
is entered and left in that task), until released, expired, cancelled or its model crashes.

A lease id is ``lease-<instance>-<random>``: ``<instance>`` names this run of the daemon and the
rest is unguessable, so an id is never issued twice, also across restarts, and a client of an
earlier run that renews or releases its old id hears that the daemon restarted (410) instead of
touching another client's lease.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Hashable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup

from orchestrator.daemon.errors import LeaseGone
from orchestrator.daemon.requests import shorten
from orchestrator.errors import NotRunning
from orchestrator.runtime import EXTERNAL_KIND, Lease, Orchestrator
from orchestrator.spec import DaemonSpec

logger = logging.getLogger("orchestrator.daemon")

REAP_PERIOD_S = 0.05  # how often expired remote leases are looked for
ENDED_KEPT = 1000  # ended lease ids remembered, so that a late renew hears why
LEASE_ID = re.compile(r"lease-([0-9a-f]{8})-[A-Za-z0-9_-]{16}")


def new_instance_id() -> str:
    return secrets.token_hex(4)


@dataclass(eq=False)
class RemoteLease:
    id: str
    model: str  # a configured model, or an external reservation's id once granted
    kind: str
    vram_bytes: int
    ttl_s: float
    priority: int
    pid: int | None
    holder: str
    url: str | None = None
    gpus: tuple[int, ...] = ()  # the card(s) that serve it, first card first
    expires_s: float = math.inf  # monotonic; the ttl counts from the grant
    waited_s: float = 0.0
    granted: anyio.Event = field(default_factory=anyio.Event)
    released: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    error: BaseException | None = None
    end_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "id": self.id,
            "model": self.model,
            "kind": self.kind,
            "bytes": self.vram_bytes,
            "url": self.url,
            "gpus": list(self.gpus),
            "ttl_s": self.ttl_s,
            "expires_at": time.time() + (self.expires_s - now) if self.expires_s != math.inf else None,
            "expires_in_s": max(0.0, self.expires_s - now) if self.expires_s != math.inf else None,
            "waited_s": self.waited_s,
            "priority": self.priority,
            "pid": self.pid,
            "holder": self.holder,
            "granted": self.granted.is_set() and self.error is None,
        }


class LeaseManager:
    """The daemon's remote leases, each held in a task of this manager's task group."""

    def __init__(self, orch: Orchestrator, spec: DaemonSpec, *, instance_id: str | None = None) -> None:
        self.orch = orch
        self.spec = spec
        self.instance_id = instance_id or new_instance_id()
        self._leases: dict[str, RemoteLease] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._tg: TaskGroup | None = None

    async def __aenter__(self) -> LeaseManager:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._reap, name="vram-orchestrator lease reaper")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        tg, self._tg = self._tg, None
        if tg is None:
            return
        for rl in list(self._leases.values()):
            self._end(rl, "cancelled: the daemon is shutting down")
        tg.cancel_scope.cancel()
        await tg.__aexit__(None, None, None)

    def leases(self) -> list[RemoteLease]:
        return list(self._leases.values())

    def new_id(self) -> str:
        return f"lease-{self.instance_id}-{secrets.token_urlsafe(12)}"

    async def open(
        self,
        *,
        model: str | None,
        n_bytes: int | None,
        priority: int,
        timeout_s: float | None,
        ttl_s: float,
        pid: int | None,
        holder: str,
        owner: Hashable | None = None,
    ) -> RemoteLease:
        """Wait for the lease (cancelled with the request) and return it, granted."""
        if self._tg is None:
            raise NotRunning()
        cm: AbstractAsyncContextManager[Lease]
        lease_id = self.new_id()
        if model is not None:
            spec = self.orch.resolve(model)
            cm = self.orch.acquire(spec.name, timeout=timeout_s, priority=priority, owner=owner)
            vram_bytes = self.orch.estimate(spec.name).estimated_vram_bytes
            rl = RemoteLease(lease_id, spec.name, spec.kind, vram_bytes, ttl_s, priority, pid, holder)
        else:
            assert n_bytes is not None
            cm = self.orch.reserve(
                n_bytes, timeout=timeout_s, priority=priority, pid=pid, holder=holder, owner=owner
            )
            rl = RemoteLease(lease_id, "", EXTERNAL_KIND, n_bytes, ttl_s, priority, pid, holder)
        self._leases[rl.id] = rl
        self._tg.start_soon(self._hold, rl, cm, name=f"vram-orchestrator {rl.id}")
        try:
            await rl.granted.wait()
        except BaseException:
            self._end(rl, "cancelled while waiting: the client went away")
            raise
        if rl.error is not None:
            raise rl.error
        return rl

    async def _hold(self, rl: RemoteLease, cm: AbstractAsyncContextManager[Lease]) -> None:
        try:
            with rl.scope:
                async with cm as lease:
                    rl.model = lease.model
                    rl.waited_s = lease.waited_s
                    backend = self.orch.backends.get(lease.model)  # an external one has none
                    rl.url = backend.url if backend is not None else None
                    rl.gpus = tuple(c.index for c in lease.devices)
                    rl.expires_s = time.monotonic() + rl.ttl_s
                    rl.granted.set()
                    await rl.released.wait()
        except Exception as exc:
            rl.error = exc
            if not rl.end_reason:
                rl.end_reason = f"ended: {exc}"
            logger.warning("remote lease %s on %s ended: %s", rl.id, rl.model or rl.kind, exc)
        finally:
            self._leases.pop(rl.id, None)
            self._ended[rl.id] = rl.end_reason or "released"
            while len(self._ended) > ENDED_KEPT:
                self._ended.popitem(last=False)
            rl.granted.set()
            rl.done.set()

    def _end(self, rl: RemoteLease, reason: str) -> None:
        if not rl.end_reason:
            rl.end_reason = reason
        rl.released.set()
        if not rl.granted.is_set():
            rl.scope.cancel()  # still waiting for its grant: stop waiting

    def get(self, lease_id: str) -> RemoteLease:
        rl = self._leases.get(lease_id)
        if rl is not None and not rl.released.is_set():
            return rl
        why = self._ended.get(lease_id) or (rl.end_reason if rl is not None else None)
        if why is not None:
            raise LeaseGone(410, f"lease {lease_id!r} has ended ({why}); acquire a new one", "lease_gone")
        raise self.never_issued(lease_id)

    def never_issued(self, lease_id: str) -> LeaseGone:
        """410 for an id this run of the daemon never gave out, saying why that can be."""
        shown = shorten(lease_id)
        issued = LEASE_ID.fullmatch(lease_id)
        if issued is not None and issued.group(1) != self.instance_id:
            return LeaseGone(
                410,
                f"lease {shown} was issued by an earlier run of the daemon (instance {issued.group(1)}; "
                f"this is {self.instance_id}): the daemon restarted and the lease ended with it; "
                "acquire a new one with POST /v1/leases",
                "lease_gone",
            )
        return LeaseGone(
            410,
            f"no lease {shown} was issued by this daemon (instance {self.instance_id}); acquire one "
            "with POST /v1/leases",
            "lease_not_found",
        )

    def renew(self, lease_id: str) -> RemoteLease:
        rl = self.get(lease_id)
        rl.expires_s = time.monotonic() + rl.ttl_s
        return rl

    async def release(self, lease_id: str) -> RemoteLease:
        rl = self.get(lease_id)
        self._end(rl, "released by its holder")
        await rl.done.wait()  # the orchestrator has it back when this answers
        return rl

    async def _reap(self) -> None:
        while True:
            now = time.monotonic()
            for rl in list(self._leases.values()):
                if rl.granted.is_set() and not rl.released.is_set() and rl.expires_s <= now:
                    reason = f"expired: not renewed within its ttl of {rl.ttl_s:g} s"
                    logger.warning("remote lease %s on %s %s", rl.id, rl.model, reason)
                    self.orch.emit_event("lease_expired", model=rl.model, detail=f"{rl.id} {reason}")
                    self._end(rl, reason)
            await anyio.sleep(REAP_PERIOD_S)
