"""Crash watching: a resident whose process dies is noticed at once, not at the next check.

The ledger and the machine are made true at that moment, the leases on it get
``BackendCrashed`` (their blocks are cancelled), the model backs off, and the scheduler is
woken: the reaper stops what is left of the process, and the next acquire starts it again.
"""

from __future__ import annotations

import logging

import anyio
from anyio.abc import TaskGroup

from orchestrator.backends.base import Backend
from orchestrator.errors import BackendCrashed
from orchestrator.runtime.context import Context
from orchestrator.runtime.queue import LeaseBook
from states.ledger import Tier

logger = logging.getLogger("orchestrator")


class CrashWatch:
    def __init__(self, ctx: Context, book: LeaseBook) -> None:
        self.ctx = ctx
        self.book = book
        self.tg: TaskGroup | None = None  # the orchestrator's task group while it runs
        self._scopes: dict[str, anyio.CancelScope] = {}

    def start(self, model: str) -> None:
        """Watch ``model``'s process (backends without a process of their own are skipped)."""
        backend = self.ctx.backends[model]
        if type(backend).wait_exit is Backend.wait_exit or self.tg is None:
            return
        self.stop(model)
        scope = anyio.CancelScope()
        self._scopes[model] = scope
        self.tg.start_soon(self._watch, model, scope, name=f"vram-orchestrator watch {model}")

    def stop(self, model: str) -> None:
        scope = self._scopes.pop(model, None)
        if scope is not None:
            scope.cancel()

    async def _watch(self, model: str, scope: anyio.CancelScope) -> None:
        with scope:
            reason = await self.ctx.backends[model].wait_exit()
            self._scopes.pop(model, None)
            self.crashed(model, reason)

    def crashed(self, model: str, reason: str) -> None:
        ctx = self.ctx
        if ctx.cards.get(model) is None:
            return
        err = BackendCrashed(model, reason)
        gpus = ctx.gpus_of(model)
        ctx.cards = ctx.cards.move(model, Tier.DISK)
        ctx.note_lost(model)
        scopes = self.book.scopes.get(model, {})
        for scope in scopes:
            scopes[scope] = err
            scope.cancel()
        for gpu in gpus:
            if not ctx.switching_on((gpu,)):
                ctx.fire("settle", model=model, gpu=gpu, detail="crashed")
        n, backoff = ctx.back_off(model, err)
        logger.error("%s crashed (%d in a row; restart allowed in %.2f s): %s", model, n, backoff, reason)
        ctx.emit("crash", model=model, detail=reason)
        ctx.wake()  # the reaper stops what is left of it; waiters get it restarted
