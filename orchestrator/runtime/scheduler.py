"""The scheduler loop: snapshot, decide, do. The only code that grants, fails and switches.

Each step reads the device (foreign memory, reservations' real use), takes a frozen
snapshot (``StepView``), asks ``states.step.decide`` once, applies the grants and failures
and the drains, and runs the decision's one action through the executor. Then it sleeps
until the decision's wake time or until something changes (a new waiter, a release, a crash).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import anyio
from anyio.abc import TaskGroup

from orchestrator.config import Config
from orchestrator.runtime.accounting import Accounting
from orchestrator.runtime.context import Context
from orchestrator.runtime.executor import Executor
from orchestrator.runtime.externals import Externals
from orchestrator.runtime.outcomes import SwitchOutcome
from orchestrator.runtime.queue import LeaseBook
from states.ledger import Tier
from states.plan import Deferred, PlanRequest
from states.step import Decision, Evict, Reap, StepSettings, StepView, Switch, decide

MIN_SLEEP_S = 0.0005  # the shortest sleep between two steps that found nothing to do now


def settings_of(config: Config) -> StepSettings:
    # Foreign memory can grow while nothing happens here: look at the device now and then
    # (at the sampler's rate, at least once a second).
    look = min(1.0, 1.0 / config.sample_hz) if config.sample_hz > 0 else 1.0
    return StepSettings(
        mode=config.mode,
        fairness_by_cost=config.fairness == "cost",
        fairness_s=config.fairness_s,
        max_wait_s=config.max_wait_s,
        foreign_memory_fails=config.foreign_memory == "fail",
        look_period_s=look,
    )


class Scheduler:
    def __init__(
        self,
        ctx: Context,
        book: LeaseBook,
        accounting: Accounting,
        executor: Executor,
        externals: Externals,
    ) -> None:
        self.ctx = ctx
        self.book = book
        self.accounting = accounting
        self.executor = executor
        self.externals = externals
        self.settings = settings_of(ctx.config)
        self.deferred: dict[str, Deferred] = {}  # requests waiting for foreign memory, for messages
        self._outcome: SwitchOutcome | None = None  # how the last switch ended
        # Several cards: the action running on each busy card, and how each card's last
        # switch ended (read by the next step, then forgotten).
        self._running: dict[int, Switch | Evict | Reap] = {}
        self._outcomes: dict[int, SwitchOutcome] = {}
        self._tg: TaskGroup | None = None

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            while True:
                wake = self.ctx.next_wake()
                delay = await self.step()
                if delay == 0:
                    continue
                with anyio.move_on_after(delay):
                    await wake.wait()

    async def step(self) -> float | None:
        """One step. Returns how long to sleep (0: step again at once; None: until poked)."""
        self.externals.forget_ended()
        self.accounting.refresh_foreign()
        self.externals.check_usage()
        view = self.snapshot()
        d = decide(view)
        self._outcome = None
        self._outcomes.clear()
        self.apply(d)
        if d.action is not None:
            await self.execute(d.action)
            return 0
        if d.actions and self._tg is not None:
            # Several cards: each action runs on its own, one per card; the loop goes on
            # deciding for the other cards, and an action's end wakes it.
            for gpu, action in d.actions:
                self._start(gpu, action)
            return 0
        return None if d.wake_at_s is None else max(MIN_SLEEP_S, d.wake_at_s - view.now_s)

    def _start(self, gpu: int, action: Switch | Evict | Reap) -> None:
        gpus = (gpu, *(g for g, _ in action.more)) if isinstance(action, Switch) else (gpu,)
        for g in gpus:
            self._running[g] = action
        assert self._tg is not None
        self._tg.start_soon(self._run_action, gpu, gpus, action, name=f"vram-orchestrator switch cuda:{gpu}")

    async def _run_action(self, gpu: int, gpus: tuple[int, ...], action: Switch | Evict | Reap) -> None:
        try:
            outcome = await self.execute(action, gpu)
            if outcome is not None:
                self._outcomes[gpu] = outcome
        finally:
            for g in gpus:
                self._running.pop(g, None)
            self.ctx.wake()

    def snapshot(self) -> StepView:
        ctx, book, ex = self.ctx, self.book, self.executor
        cards = ctx.cards
        wanted = {w.model for w in book.waiters} | {m for m, n in book.leases.items() if n}
        known = frozenset(m for m in wanted if m in ctx.config.models or m in ctx.externals)
        requests = _Requests(known, self.accounting.request)
        leftovers = frozenset(
            n for n, b in ctx.backends.items() if b.tier is not Tier.DISK and cards.get(n) is None
        )
        outcome = self._outcome
        failed = (
            (outcome.target, outcome.error) if outcome is not None and outcome.error is not None else None
        )
        foreign = ""
        if self.settings.foreign_memory_fails and cards.foreign_bytes:
            foreign = self.accounting.foreign_text()
        several = self._several(known, leftovers) if ctx.several else {}
        return StepView(
            now_s=ctx.now_s(),
            ledger=cards.ledgers[0],  # the one card's (with several, decide reads ``cards``)
            waiters=tuple(w.view for w in book.waiters),
            requests=requests,
            policy=ctx.policy,
            settings=self.settings,
            leases=book.leases,
            holders=book.holders,
            lost_gpu_s=ctx.lost_gpu_s,
            last_release=book.last_release,
            hold_s=book.hold_s,
            backoff_until=ctx.backoff_until,
            to_unload=ctx.to_unload,
            leftovers=leftovers,
            reap_after=ex.reap_after,
            rebalance_after_s=ex.rebalance_after_s,
            just_loaded=outcome.target if outcome is not None and outcome.loaded else None,
            just_failed=failed,
            foreign_text=foreign,
            capacity=ctx.capacity,
            costs=ctx.costs,
            **several,
        )

    def _several(self, known: frozenset[str], leftovers: frozenset[str]) -> dict[str, Any]:
        """The snapshot's fields for a machine with several cards."""
        ctx = self.ctx
        models = ctx.config.models
        in_flight: set[str] = set()
        loading: dict[str, tuple[int, ...]] = {}
        host_pending = 0
        for gpu, action in self._running.items():
            if isinstance(action, Switch):
                if gpu not in (g for g, _ in action.more):
                    loading[action.plan.load] = (gpu, *(g for g, _ in action.more))
                for p in (action.plan, *(q for _, q in action.more)):
                    in_flight.add(p.load)
                    for e in p.evictions:
                        in_flight.add(e.model)
                        if e.to_tier is Tier.HOST and ctx.cards.tier_of(e.model) is not Tier.HOST:
                            r = ctx.cards.get(e.model)
                            host_pending += r.host_bytes if r is not None else 0
            elif isinstance(action, Evict | Reap):
                in_flight.update(action.models)
        outcomes = self._outcomes
        return {
            "cards": ctx.cards,
            "busy": frozenset(self._running),
            "in_flight": frozenset(in_flight),
            "loading": loading,
            "card_used_s": dict(ctx.card_used_s),
            "host_pending_bytes": host_pending,
            "allowed": {m: s.gpus for m, s in models.items() if s.gpus is not None},
            "spans": {m: s.tensor_parallel for m, s in models.items() if s.tensor_parallel > 1},
            "portable": frozenset(m for m in known if m in models and ctx.backends[m].host_copy_portable),
            "home": {m: ctx.home(m)[0] for m in leftovers},
            "loaded_on": {g: o.target for g, o in outcomes.items() if o.loaded},
            "failed_on": {g: (o.target, o.error) for g, o in outcomes.items() if o.error is not None},
        }

    def apply(self, d: Decision) -> None:
        """The decision's bookkeeping: failures, grants, drains, deferrals, settled unloads."""
        book, ctx = self.book, self.ctx
        for seq, error in d.failures:
            book.fail(book.waiter(seq), error)
        for seq in d.grants:
            book.grant(book.waiter(seq))
        book.draining = d.drain
        self.deferred = dict(d.deferred)
        for m in d.settled_unloads:
            ctx.to_unload.pop(m, None)

    async def execute(self, action: Switch | Evict | Reap, gpu: int | None = None) -> SwitchOutcome | None:
        """Run one action (on card ``gpu``; the first card by default)."""
        if isinstance(action, Switch):
            outcome = await self.executor.switch(action.plan, gpu, action.more)
            self._outcome = outcome
            return outcome
        if isinstance(action, Evict):
            if action.requested:
                for m in action.models:
                    self.ctx.to_unload.pop(m, None)
            await self.executor.evict(action.models, action.reason, gpu)
        else:
            await self.executor.reap(action.models)
        return None


class _Requests(Mapping[str, PlanRequest]):
    """The plan requests of the models a step may need, each made when first read: most
    steps (a lease on a resident model) read none, and an estimate reads learned footprints."""

    def __init__(self, models: frozenset[str], make: Callable[[str], PlanRequest]) -> None:
        self._models = models
        self._make = make
        self._made: dict[str, PlanRequest] = {}

    def __getitem__(self, model: str) -> PlanRequest:
        if model not in self._models:
            raise KeyError(model)
        made = self._made.get(model)
        if made is None:
            made = self._made[model] = self._make(model)
        return made

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)
