"""The one place that does: every action the scheduler starts is carried out here, and every
unload and every load goes through here.

- the one unload path (``unloading.Unloader``, which the executor delegates to): for a
  switch's evictions, an eviction that loads nothing (rebalancing, requested unloads), the
  shutdown and the reaping of leftovers; the backend call under a deadline and a shielded
  second try, the ledger updated after each success, then the verified release wait.
- ``load(plan)`` is the one load path, for cold loads and restores from the host tier: the
  room checked on the device, the bytes committed, the backend capped at its reservation, a
  failure cleaned up (shielded, with a deadline) and translated into the project's errors.
- ``switch(plan)`` runs a plan (its evictions, then its load) between the machine's
  ``begin_switch`` and ``finish_switch`` / ``fail_switch``; ``evict``, ``reap`` (with
  ``adopt``) and ``shutdown`` are the other actions, each between the machine's triggers.

One switch at a time on each card: the scheduler is the only caller, and each action holds
the switch lock of every card it touches (switches on different cards run at the same time).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import anyio

from orchestrator.device.base import DeviceOutOfMemory
from orchestrator.errors import BackendError, BackendOutOfMemory, LoadFailed, VRAMNotReleased
from orchestrator.runtime.accounting import Accounting, NoRoom
from orchestrator.runtime.context import Context
from orchestrator.runtime.outcomes import ShutdownReport, SwitchOutcome
from orchestrator.runtime.queue import LeaseBook
from orchestrator.runtime.unloading import RELEASE_POLL_S, Unloader
from orchestrator.runtime.watch import CrashWatch
from states.adopt import adoption
from states.ledger import Resident, Tier
from states.plan import Eviction, Plan
from states.step import DEFERRED_POLL_S
from states.units import format_gib

logger = logging.getLogger("orchestrator")


class Executor:
    """Carries out the scheduler's actions, one at a time on each card, under its switch locks;
    its unloads go through its ``Unloader``, its loads through ``load``."""

    def __init__(self, ctx: Context, book: LeaseBook, accounting: Accounting, watch: CrashWatch) -> None:
        self.ctx = ctx
        self.book = book
        self.accounting = accounting
        self.watch = watch
        self.unloader = Unloader(ctx, watch)  # the one unload path, for every action here
        self._locks: dict[int, anyio.Lock] = {}  # per card, made where the orchestrator runs (see lock)
        self.rebalance_after_s = 0.0  # a failed eviction is retried after this
        self.reap_after: dict[str, float] = {}  # a leftover whose unload failed: retried then

    def lock(self, gpu: int) -> anyio.Lock:
        """Card ``gpu``'s switch lock, made on first use: an anyio primitive belongs to the
        event loop it is made in, and ModelManager builds the orchestrator in one loop and
        runs it in another (its own thread)."""
        lock = self._locks.get(gpu)
        if lock is None:
            lock = self._locks[gpu] = anyio.Lock()
        return lock

    @contextmanager
    def switching(self, gpus: Sequence[int]) -> Iterator[None]:
        """Hold the switch locks of cards ``gpus``, taken without a checkpoint.

        The scheduler decides and starts a switch in one synchronous stretch: if taking a
        lock yielded, a lease could be granted (acquire's fast path) on a model the switch is
        about to evict. The scheduler is the only switcher while running, and starts nothing
        on a card that is busy, so the locks are free.
        """
        taken: list[anyio.Lock] = []
        try:
            for g in gpus:
                lock = self.lock(g)
                lock.acquire_nowait()
                taken.append(lock)
            yield
        finally:
            for lock in taken:
                lock.release()

    # -- the actions -------------------------------------------------------------------------

    async def switch(
        self, p: Plan, gpu: int | None = None, more: Sequence[tuple[int, Plan]] = ()
    ) -> SwitchOutcome:
        """Evict, then load, between ``begin_switch`` and ``finish_switch`` / ``fail_switch``,
        on card ``gpu`` (the first by default); a spanning model's switch also runs ``more``
        (its plans on its other cards): one joint switch. However it ends, a card whose ledger
        changed under it (a spanning model it evicted) lands where its ledger says."""
        try:
            return await self._switch(p, gpu, more)
        finally:
            self.ctx.settle_cards()

    async def _switch(
        self, p: Plan, gpu: int | None = None, more: Sequence[tuple[int, Plan]] = ()
    ) -> SwitchOutcome:
        ctx = self.ctx
        target = p.load
        plans = [(ctx.first_gpu() if gpu is None else gpu, p), *more]
        gpus = [g for g, _ in plans]
        with self.switching(gpus):
            t0 = ctx.now_s()
            for g, q in plans:
                ctx.fire("begin_switch", q.after, model=target, gpu=g)
            try:
                for _, q in plans:
                    await self.unloader.unload(
                        q.evictions,
                        why=f"for {target}",
                        during=f"while evicting it for {target!r}",
                        counted=True,
                        strict=True,
                    )
                await self.load(p, tuple(gpus), tuple(q.after.loading for _, q in plans if q.after.loading))
            except BaseException as exc:
                for g in gpus:
                    ctx.fire("fail_switch", model=target, gpu=g, t0=t0)
                ctx.stats.failed_switches += 1
                ctx.stats.switching_s += ctx.now_s() - t0
                if isinstance(exc, NoRoom):
                    # Memory appeared that the ledger did not know of: nobody failed; the
                    # next step reads the device again and waits for room (or fails, per
                    # switching.foreign_memory).
                    ctx.backoff_until[target] = ctx.now_s() + DEFERRED_POLL_S
                    ctx.emit("fail", model=target, gpu=gpus[0], detail=str(exc.error))
                    return SwitchOutcome(target)
                if isinstance(exc, Exception):
                    n, backoff = ctx.back_off(target, exc)
                    logger.warning(
                        "switch to %s failed (%d in a row; retry in %.2f s): %s", target, n, backoff, exc
                    )
                    ctx.emit("fail", model=target, gpu=gpus[0], detail=str(exc))
                    return SwitchOutcome(target, error=exc)  # its waiters get the error
                raise
            ctx.stats.switching_s += ctx.now_s() - t0
            ctx.stats.switches += 1
            if any(q.gpu_evictions for _, q in plans):
                ctx.stats.exchanges += 1
            ctx.succeeded(target)
            for g in gpus:
                ctx.fire("finish_switch", model=target, gpu=g, t0=t0)
        return SwitchOutcome(target, loaded=True)

    async def evict(self, models: Sequence[str], why: str, gpu: int | None = None) -> None:
        """A switch that loads nothing on card ``gpu`` (the first by default): unload idle GPU
        residents to disk. A failure backs evictions off for ``retry_backoff_s``."""
        ctx = self.ctx
        gpu = ctx.first_gpu() if gpu is None else gpu
        after = ctx.cards.ledger(gpu)
        for m in models:
            if after.get(m) is not None:
                after = after.move(m, Tier.DISK)
        with self.switching([gpu]):
            t0 = ctx.now_s()
            detail = f"unloading {', '.join(models)} ({why})"
            ctx.fire("begin_switch", after, model=None, gpu=gpu, detail=detail)
            try:
                steps = [Eviction(m, Tier.GPU, Tier.DISK) for m in models]
                await self.unloader.unload(
                    steps, why=f"({why})", during=f"while evicting it ({why})", counted=True
                )
            except Exception as exc:
                logger.error("evicting %s (%s) failed: %s", ", ".join(models), why, exc)
                self.rebalance_after_s = ctx.now_s() + max(ctx.config.retry_backoff_s, RELEASE_POLL_S)
            finally:
                ctx.fire("finish_switch", model=None, gpu=gpu, t0=t0)
                ctx.settle_cards()

    async def reap(self, models: Sequence[str]) -> None:
        """Unload what a backend still holds but the ledger does not (a failed cleanup).

        Such memory counts as foreign meanwhile, so the budget stays safe; this gives it back.
        A leftover whose unload fails again is retried after ``retry_backoff_s``.
        """
        ctx = self.ctx
        for name in models:
            backend = ctx.backends.get(name)
            if backend is None or backend.tier is Tier.DISK:
                self.reap_after.pop(name, None)
                continue
            with self.switching(ctx.home(name)[:1]):
                adopted = await self.adopt(name)
            if adopted:
                self.reap_after.pop(name, None)
                continue
            try:
                with self.switching(ctx.home(name)[:1]):
                    step = Eviction(name, backend.tier, Tier.DISK)
                    await self.unloader.unload(
                        [step],
                        why="(left over by a failed cleanup)",
                        during="while reaping it",
                        counted=False,
                    )
                self.reap_after.pop(name, None)
            except Exception as exc:
                self.reap_after[name] = ctx.now_s() + max(ctx.config.retry_backoff_s, RELEASE_POLL_S)
                logger.warning("%s still holds memory after a failed cleanup; retrying: %s", name, exc)

    async def adopt(self, name: str) -> bool:
        """Record a model its own program holds outside the ledger (loaded by hand there, or
        there already when the orchestrator attached) as resident in place, without a load,
        when the ledger with it fits (``states.adopt.adoption``): an ``adopt`` event, the
        machine settled where the ledger lands, the model watched like a loaded one. False
        when the backend has no such copy or it does not fit: the caller gives it back."""
        ctx = self.ctx
        backend = ctx.backends[name]
        gpu = ctx.home(name)[0]  # the card its program's memory is on
        if name not in ctx.config.models or ctx.cards.get(name) is not None or ctx.switching_on((gpu,)):
            return False
        try:
            held = await backend.held_outside_bytes()
        except Exception as exc:
            logger.warning("cannot tell what %s's program holds of it: %s", name, exc)
            return False
        if not held:
            return False
        after = adoption(self.accounting.request(name), ctx.cards.view(gpu), held, ctx.policy)
        if after is None:
            logger.warning(
                "%s is on the GPU outside the orchestrator (%s) and does not fit beside %s (the "
                "budget, or another heavy model): it is given back",
                name,
                format_gib(held),
                ctx.cards.ledger(gpu).describe(),
            )
            return False
        backend.adopt()
        ctx.cards = ctx.cards.with_view(gpu, after)
        ctx.emit(
            "adopt",
            gpu=gpu,
            model=name,
            bytes_after=held,
            detail=f"on the GPU already ({format_gib(held)}): taken over in place, not loaded",
        )
        ctx.fire("settle", model=name, gpu=gpu, detail="adopted")
        self.accounting.learn(name, held, "load")
        self.watch.start(name)
        return True

    async def shutdown(self) -> ShutdownReport:
        """Unload everything and close every backend; say what really happened."""
        ctx = self.ctx
        report = ShutdownReport()
        # Leases held by tasks outside the `async with orch` block get a grace period.
        with anyio.move_on_after(ctx.config.unload_timeout_s):
            while any(self.book.leases.values()):  # noqa: ASYNC110 - leases end in other tasks; poll briefly
                await anyio.sleep(RELEASE_POLL_S)
        for gpu in ctx.cards.indexes:
            await self.lock(gpu).acquire()
        try:
            held = [g for g, led in zip(ctx.cards.indexes, ctx.cards.ledgers, strict=True) if led.residents]
            t0 = ctx.now_s()
            for gpu in held:
                empty = ctx.cards.ledger(gpu)
                for r in empty.residents:
                    empty = empty.move(r.model, Tier.DISK)
                ctx.fire("begin_switch", empty, model=None, gpu=gpu, detail="shutdown: unloading everything")
            done: set[str] = set()
            for r in list(ctx.cards.residents):
                if r.model in done:
                    continue  # a spanning model: once
                done.add(r.model)
                try:
                    step = Eviction(r.model, r.tier, Tier.DISK)
                    await self.unloader.unload([step], why="(shutdown)", during="at shutdown", counted=False)
                    report.unloaded.append(r.model)
                except Exception as exc:
                    logger.error("could not unload %s at shutdown: %s", r.model, exc)
                    report.failed[r.model] = str(exc)
            for gpu in held:
                trigger = "fail_switch" if ctx.cards.ledger(gpu).residents else "finish_switch"
                ctx.fire(trigger, model=None, gpu=gpu, t0=t0)
            ctx.settle_cards()
            for b in list(ctx.backends.values()):
                try:
                    with anyio.fail_after(ctx.config.unload_timeout_s):
                        await b.aclose()
                except Exception as exc:
                    logger.error("closing backend %s failed: %s", b.name, exc)
                    report.failed.setdefault(b.name, f"closing it failed: {exc}")
            try:
                await self.unloader.wait_released(list(ctx.backends))
            except VRAMNotReleased as exc:
                logger.error("at shutdown: %s", exc)
                report.failed.setdefault(exc.model, str(exc))
        finally:
            for gpu in ctx.cards.indexes:
                self.lock(gpu).release()
        return report

    # -- the one load path -------------------------------------------------------------------

    async def load(self, p: Plan, gpus: tuple[int, ...] = (), shares: Sequence[Resident] = ()) -> None:
        """Bring ``p.load`` onto the GPU (a cold load, or a restore from the host tier): onto
        cards ``gpus`` (the first card by default), with ``shares[i]`` committed on
        ``gpus[i]`` (by default the plan's load)."""
        ctx = self.ctx
        backend = ctx.backends[p.load]
        resident = p.after.loading
        assert resident is not None
        gpus = gpus or (ctx.cards.indexes[0],)
        shares = list(shares) or [resident]
        for g, share in zip(gpus, shares, strict=True):
            self.accounting.check_room(p.load, share.vram_bytes, g)
        # The backend serves from these cards: in-process models load on cuda:N, servers
        # start with CUDA_VISIBLE_DEVICES naming them.
        backend.bind(gpus, tuple(self.accounting.devices[g] for g in gpus))
        for g, share in zip(gpus, shares, strict=True):
            ctx.cards = ctx.cards.begin_load(g, share)
        # A cold load comes from the packed disk cache or from the source: a cost of its own.
        origin = "host" if p.from_tier is Tier.HOST else ("cache" if backend.cached else "source")
        t0 = ctx.now_s()
        try:
            # The backend may not take more than the bytes the ledger reserves for it: a
            # model bigger than its estimate fails to load (and is learned) instead of
            # pushing the device past the budget.
            with anyio.fail_after(ctx.config.load_timeout_s):
                if p.from_tier is Tier.HOST:
                    await backend.restore(limit_bytes=resident.vram_bytes)
                else:
                    await backend.load(limit_bytes=resident.vram_bytes)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(ctx.config.unload_timeout_s):
                    try:
                        await backend.unload()
                    except Exception as again:
                        logger.error("cleanup of failed load of %s failed: %s", p.load, again)
                still = backend.measured_bytes(live_only=False)
                if still:
                    # The memory stayed: it is no longer ours in the ledger, so it counts as
                    # foreign until the device shows it gone (see Accounting.refresh_foreign).
                    logger.error("failed load of %s left %s on the device", p.load, format_gib(still))
                for g in gpus:
                    ctx.cards = ctx.cards.abort_load(g)
            err = self._load_error(p, exc)
            if err is exc:
                raise  # already the project's error (or a cancellation)
            raise err from exc
        for g in gpus:
            ctx.cards = ctx.cards.finish_load(g)
        if p.from_tier is Tier.HOST:
            ctx.stats.restores += 1
        else:
            ctx.stats.loads += 1
        ctx.learn_cost(
            p.load, "restore_s" if p.from_tier is Tier.HOST else "load_s", ctx.now_s() - t0, origin=origin
        )
        ctx.emit(
            "load",
            gpu=gpus[0],
            model=p.load,
            duration_s=ctx.now_s() - t0,
            detail=f"from {p.from_tier.value}" + (" (packed cache)" if origin == "cache" else ""),
            bytes_after=resident.vram_bytes,  # what the ledger holds for it
        )
        if len(gpus) == 1:  # a spanning model's reading is one card's share: nothing to learn
            self.accounting.learn(p.load, backend.measured_bytes(live_only=True), "load")
        self.watch.start(p.load)

    def _load_error(self, p: Plan, exc: BaseException) -> BaseException:
        """The project's error for a failed load (the original is its ``__cause__``)."""
        if isinstance(exc, DeviceOutOfMemory):
            self.accounting.learn(p.load, exc.requested_bytes, "peak")
            est = self.accounting.estimate(p.load)
            nxt = (
                f"; it needs {format_gib(exc.requested_bytes)}, learned: it is planned at "
                f"{format_gib(est.estimated_vram_bytes)} from now on"
                if est.source == "measured"
                else ""
            )
            return BackendOutOfMemory(p.load, f"{exc}{nxt}")
        if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
            return BackendOutOfMemory(p.load, str(exc).splitlines()[0])
        if isinstance(exc, TimeoutError):
            return LoadFailed(
                p.load, f"did not finish within load_timeout_s={self.ctx.config.load_timeout_s:g}"
            )
        if isinstance(exc, Exception) and not isinstance(exc, BackendError):
            return LoadFailed(p.load, f"{type(exc).__name__}: {exc}")
        return exc
