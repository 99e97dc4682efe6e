"""The waiter queue and the lease book: who waits for which model, who holds which lease.

``LeaseBook.hold()`` is the life of one acquire(): queue a waiter, wait for the scheduler's
grant (or take acquire()'s fast path, which is ``states.step.grants_at_once``: what the
decision would answer for a lone waiter), hold the lease for the block, release it. The book
only records; the scheduler's decision is what grants and fails.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel

from orchestrator.errors import AcquireTimeout, BackendCrashed
from orchestrator.runtime.context import Context
from orchestrator.runtime.lease import Lease
from states.scheduling import WaiterView
from states.step import grants_at_once

RETURNS_KEPT = 4096  # (model, holder) pairs remembered, for the grace of an idle model
HOLD_WEIGHT = 0.2  # the weight of the latest lease in a model's learned lease time


@dataclass(eq=False)
class Waiter:
    seq: int
    model: str
    priority: int
    arrived_s: float
    holder: Hashable  # the task (or the remote holder) that waits: deadlock detection
    event: anyio.Event = field(default_factory=anyio.Event)
    granted: bool = False
    error: BaseException | None = None
    view: WaiterView = field(init=False)  # what the decision sees of it (made once)

    def __post_init__(self) -> None:
        self.view = WaiterView(self.seq, self.model, self.priority, self.arrived_s, self.holder)


class LeaseBook:
    """Waiters in arrival order, leases per model and per holder, and the scopes of the
    lease blocks (a crash cancels them)."""

    def __init__(
        self,
        ctx: Context,
        *,
        on_release: Callable[[str], None],
        holding_text: Callable[[str], str],
    ) -> None:
        self.ctx = ctx
        self._on_release = on_release  # learning from the use that just ended
        self._holding_text = holding_text  # who holds the GPU, for a timeout's message
        self.waiters: list[Waiter] = []
        self._by_seq: dict[int, Waiter] = {}
        self.leases: dict[str, int] = {}
        self.holders: dict[str, dict[Hashable, int]] = {}  # model -> holder -> leases it holds
        self.draining: frozenset[str] = frozenset()  # set by the scheduler's last decision
        # model -> the scopes of the blocks holding a lease on it -> the crash that ended them
        self.scopes: dict[str, dict[anyio.CancelScope, BackendCrashed | None]] = {}
        self._seq = 0
        # Who came back to a model after a lease on it ended (the grace of an idle model is
        # for them): (model, holder) pairs, the most recent RETURNS_KEPT of each. A holder is
        # a task's id, which Python may give a new task once the old one has ended: a new
        # task then passes for a user who came back, and costs at most one grace.
        self._released: OrderedDict[tuple[str, Hashable], None] = OrderedDict()
        self._returners: OrderedDict[tuple[str, Hashable], None] = OrderedDict()
        # model -> when its last lease ended and whose, if that user is one who came back
        self.last_release: dict[str, tuple[float, Hashable]] = {}
        # model -> how long a lease on it is held, learned (a moving average of the leases
        # that ended): how fast a model that serves few at once works through its queue
        # (an earlier run's figure, from the footprint store, is where each average starts)
        self.hold_s: dict[str, float] = {
            m: t["hold_s"] for m in ctx.config.models if "hold_s" in (t := ctx.stored_times(m))
        }

    # -- reading -----------------------------------------------------------------------------

    def waiter(self, seq: int) -> Waiter:
        return self._by_seq[seq]

    def active(self) -> dict[str, int]:
        return {m: n for m, n in dict(self.leases).items() if n}

    def waiting_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for w in self.waiters:
            out[w.model] = out.get(w.model, 0) + 1
        return out

    def position(self, w: Waiter) -> int:
        same = [x for x in self.waiters if x.model == w.model]
        return same.index(w) + 1 if w in same else 0

    # -- changes -----------------------------------------------------------------------------

    def grant(self, w: Waiter) -> None:
        ctx = self.ctx
        w.granted = True
        self._remove(w)
        self.leases[w.model] = self.leases.get(w.model, 0) + 1
        if (w.model, w.holder) in self._released:
            _remember(self._returners, (w.model, w.holder))
        holders = self.holders.setdefault(w.model, {})
        holders[w.holder] = holders.get(w.holder, 0) + 1
        ctx.cards = ctx.cards.touch(w.model)
        if ctx.several:
            for g in ctx.cards.gpus_of(w.model):
                ctx.card_used_s[g] = ctx.now_s()
        ctx.stats.grants += 1
        ctx.emit("grant", model=w.model, duration_s=ctx.now_s() - w.arrived_s)  # the wait
        w.event.set()

    def fail(self, w: Waiter, error: BaseException) -> None:
        w.error = error
        self._remove(w)
        w.event.set()

    def fail_all(self, error: BaseException) -> None:
        for w in list(self.waiters):
            self.fail(w, error)

    def _remove(self, w: Waiter) -> None:
        if w in self.waiters:
            self.waiters.remove(w)
        self._by_seq.pop(w.seq, None)

    def _forget(self, w: Waiter) -> None:
        if w in self.waiters:
            self._remove(w)
            self.ctx.wake()

    def _release(self, model: str, holder: Hashable) -> None:
        ctx = self.ctx
        self.leases[model] -= 1
        _remember(self._released, (model, holder))
        if (model, holder) in self._returners:  # a user who comes back: the model may wait for it
            self.last_release[model] = (ctx.now_s(), holder)
        else:
            self.last_release.pop(model, None)
        holders = self.holders[model]
        holders[holder] -= 1
        if not holders[holder]:
            del holders[holder]
        ctx.cards = ctx.cards.touch(model)
        self._on_release(model)
        ctx.stats.releases += 1
        ctx.emit("release", model=model)
        if self.waiters or not ctx.cards.fits():  # otherwise a release changes no decision
            ctx.wake()

    def _learn_hold(self, model: str, held_s: float) -> None:
        old = self.hold_s.get(model)
        self.hold_s[model] = new = held_s if old is None else old + HOLD_WEIGHT * (held_s - old)
        self.ctx.keep_time(model, "hold_s", new)  # persisted with the store's next write

    # -- one acquire -------------------------------------------------------------------------

    @asynccontextmanager
    async def hold(
        self, model: str, kind: str, timeout: float | None, priority: int, owner: Hashable | None
    ) -> AsyncIterator[Lease]:
        """Queue a waiter for ``model``, wait for the grant, hold the lease for the block.

        ``owner`` is who holds the lease for deadlock detection: the current task unless
        given (the daemon gives a remote client's task, whose leases it holds in tasks of its
        own).
        """
        ctx = self.ctx
        await anyio.lowlevel.checkpoint_if_cancelled()
        self._seq += 1
        holder = anyio.get_current_task().id if owner is None else owner
        w = Waiter(self._seq, model, priority, ctx.now_s(), holder)
        self.waiters.append(w)
        self._by_seq[w.seq] = w
        if grants_at_once(
            ctx.cards,
            model,
            queue_length=len(self.waiters),
            switching=ctx.switching_on(ctx.cards.gpus_of(model)),
            draining=self.draining,
            to_unload=ctx.to_unload,
            held=self.leases.get(model, 0),
            capacity=ctx.capacity.get(model),
        ):
            self.grant(w)
        else:
            ctx.wake()
        try:
            if not w.granted:
                with anyio.fail_after(timeout):
                    await w.event.wait()
        except BaseException as exc:
            position, queued = self.position(w), len(self.waiters)
            self._forget(w)
            if w.granted:  # granted in the same instant we were cancelled: give it back
                self._release(w.model, w.holder)
            if isinstance(exc, TimeoutError) and timeout is not None:
                ctx.stats.timeouts += 1
                ctx.emit("timeout", model=w.model, detail=f"after {timeout:g} s, position {position}")
                raise AcquireTimeout(
                    w.model, timeout, position, queued, self._holding_text(w.model)
                ) from None
            ctx.stats.cancellations += 1
            ctx.emit("cancel", model=w.model)
            raise
        if w.error is not None:
            raise w.error
        granted_s = ctx.now_s()
        waited = granted_s - w.arrived_s
        ctx.stats.record_wait(waited)
        devices = tuple(ctx.cards.card(g) for g in ctx.cards.gpus_of(model))
        lease = Lease(model, kind, ctx.backends[model].handle, waited, priority, devices)
        # If the model's process dies while the block runs, the block is cancelled and
        # BackendCrashed raised from it (see CrashWatch).
        scope = anyio.CancelScope()
        self.scopes.setdefault(model, {})[scope] = None
        try:
            with scope:
                yield lease
        finally:
            lease._end()
            crash = self.scopes.get(model, {}).pop(scope, None)
            self._learn_hold(model, ctx.now_s() - granted_s)
            self._release(model, w.holder)
        if crash is not None and scope.cancelled_caught:
            raise crash


def _remember(pairs: OrderedDict[tuple[str, Hashable], None], pair: tuple[str, Hashable]) -> None:
    """Put ``pair`` last in ``pairs``, dropping the oldest past RETURNS_KEPT."""
    pairs[pair] = None
    pairs.move_to_end(pair)
    if len(pairs) > RETURNS_KEPT:
        pairs.popitem(last=False)
