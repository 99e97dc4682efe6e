"""The one unload path, shared by every action of the executor that unloads: a switch's
evictions, an eviction that loads nothing (rebalancing, requested unloads), the reaping of
leftovers and the shutdown.

For each step: the backend call under a deadline; if it fails or is cancelled, a second,
shielded unload with a deadline (unknown how far the first got; unloading is idempotent),
after which the ledger believes the backend; the ledger updated after each success (where the
model landed), with one ``evict`` event; then the verified release wait (the device must show
the memory back).

The ``Unloader`` decides nothing and takes no lock: the executor calls it from its actions,
holding the switch lock of every card they touch, and fires the machine's triggers around it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio

from orchestrator.errors import UnloadFailed, VRAMNotReleased
from orchestrator.monitor import wait_released
from orchestrator.runtime.context import Context
from orchestrator.runtime.watch import CrashWatch
from states.ledger import Tier
from states.plan import Eviction

logger = logging.getLogger("orchestrator")

RELEASE_POLL_S = 0.002  # how often the release wait reads the device


class Unloader:
    """Carries out evictions for the executor: the backend call, the second try, the ledger's
    landing and its event, the release wait."""

    def __init__(self, ctx: Context, watch: CrashWatch) -> None:
        self.ctx = ctx
        self.watch = watch

    async def unload(
        self, steps: Sequence[Eviction], *, why: str, during: str, counted: bool, strict: bool = False
    ) -> None:
        """Carry out ``steps`` in order, then wait until the device shows the memory of those
        that left the GPU released.

        ``why`` ends each event's detail ("for sdxl-base", "(shutdown)"); ``during`` ends the
        error's message ("while evicting it for 'sdxl-base'"); ``counted``: an eviction in the
        statistics (a shutdown or a reaped leftover is not). ``strict``: a backend call that
        failed is an error even when the second try freed the model (a switch reports it to
        the waiters it was for; elsewhere the model is gone, which is all that was asked).

        :raises UnloadFailed: a backend's unload failed (the second try too, or ``strict``).
        :raises VRAMNotReleased: the memory did not come back within ``unload_timeout_s``.
        """
        freed: list[str] = []
        for step in steps:
            await self._unload_one(step, why=why, during=during, counted=counted, strict=strict)
            if step.from_tier is Tier.GPU:
                freed.append(step.model)
        await self.wait_released(freed)

    async def _unload_one(
        self, step: Eviction, *, why: str, during: str, counted: bool, strict: bool
    ) -> None:
        ctx = self.ctx
        backend = ctx.backends[step.model]
        timeout_s = ctx.config.unload_timeout_s
        self.watch.stop(step.model)
        t0 = ctx.now_s()
        try:
            with anyio.fail_after(timeout_s):
                if step.to_tier is Tier.HOST:
                    await backend.offload(Tier.HOST)
                else:
                    await backend.unload()
        except BaseException as exc:
            # Unknown how far it got: finish the unload (idempotent), shielded, bounded; then
            # believe the backend about what is still loaded.
            with anyio.CancelScope(shield=True), anyio.move_on_after(timeout_s):
                try:
                    await backend.unload()
                except Exception as again:
                    logger.warning("second unload of %s failed too: %s", step.model, again)
            recovered = not backend.is_loaded() and backend.tier is Tier.DISK
            if recovered:
                # (a switch that failed because of it counts no eviction)
                self._landed(
                    step, Tier.DISK, f"(after a failed unload) {why}", None, counted=counted and not strict
                )
            if not isinstance(exc, Exception):
                raise
            detail = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            if strict or not recovered:
                if isinstance(exc, VRAMNotReleased):
                    raise  # the backend's own verified release: it names who holds the memory
                raise UnloadFailed(step.model, f"{detail} {during}") from exc
            logger.warning("unloading %s failed (%s) %s; the second try freed it", step.model, detail, during)
            return
        # A backend may fall back from keeping a host copy to dropping it (a vLLM server
        # that cannot sleep): the ledger follows what it really did.
        landed = backend.tier if backend.tier is not Tier.GPU else step.to_tier
        if step.from_tier is Tier.GPU:
            ctx.learn_cost(step.model, "offload_s" if landed is Tier.HOST else "unload_s", ctx.now_s() - t0)
        self._landed(step, landed, why, ctx.now_s() - t0, counted=counted)

    def _landed(
        self, step: Eviction, landed: Tier, why: str, duration_s: float | None, *, counted: bool
    ) -> None:
        ctx = self.ctx
        gpu = ctx.gpus_of(step.model)[0]  # before it leaves: the card it leaves
        if ctx.cards.get(step.model) is not None:
            ctx.cards = ctx.cards.move(step.model, landed)
            ctx.settle_cards()  # a spanning model left its other cards too: they land at once
        if step.from_tier is Tier.GPU:
            ctx.note_lost(step.model)
        if counted:
            ctx.stats.evictions += 1
        ctx.emit(
            "evict",
            gpu=gpu,
            model=step.model,
            duration_s=duration_s,
            detail=f"{step.from_tier.value} -> {landed.value} {why}",
        )

    async def wait_released(self, models: list[str]) -> None:
        """Wait until the device shows the models' memory back, with a deadline."""
        if not models:
            return
        backends = self.ctx.backends

        def still_held() -> list[tuple[str, int]]:
            return [(m, backends[m].measured_bytes(live_only=False) or 0) for m in models]

        await wait_released(
            still_held,
            timeout_s=self.ctx.config.unload_timeout_s,
            poll_s=RELEASE_POLL_S,
            clock=self.ctx.clock,
        )
