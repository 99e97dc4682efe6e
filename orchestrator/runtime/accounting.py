"""Device accounting: what our residents really hold, what others hold, and what is learned.

- ``refresh_foreign`` reads the device and enters into the ledger the bytes it does not
  account for (other processes, memory a failed cleanup left) and residents measured larger
  than planned.
- ``check_room`` is the last check before a load: the device, not only the ledger, must have
  the room.
- ``learn`` keeps what a model really took, when it is more than known. The footprint store
  is updated in memory at once; its file is written by ``run_writer`` in a worker thread, so
  no file lock or file IO happens on the event loop (a lease's release learns).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import anyio

from orchestrator.device.base import Device, DeviceReading
from orchestrator.errors import InsufficientVRAM
from orchestrator.footprints import FootprintStore
from orchestrator.monitor import ModelEstimate, describe_processes, foreign_processes, planning_estimate
from orchestrator.runtime.context import Context
from orchestrator.runtime.lease import EXTERNAL_KIND
from orchestrator.spec import card_share_bytes
from states.ledger import Resident, Tier
from states.plan import PlanRequest
from states.units import format_gib

logger = logging.getLogger("orchestrator")


class NoRoom(Exception):
    """The device lacks the room the ledger promised (foreign memory appeared)."""

    def __init__(self, error: InsufficientVRAM) -> None:
        super().__init__(str(error))
        self.error = error


class Accounting:
    def __init__(self, ctx: Context, devices: Mapping[int, Device], footprints: FootprintStore) -> None:
        self.ctx = ctx
        self.devices = dict(devices)  # one per card
        self.device = self.devices[ctx.first_gpu()]
        self.footprints = footprints
        self._dirty: anyio.Event | None = None  # made by run_writer, in the orchestrator's loop
        ctx.on_learned = self._wake_writer  # a learned switch cost is persisted as a footprint is

    def _wake_writer(self) -> None:
        if self._dirty is not None:
            self._dirty.set()

    # -- what the device holds ---------------------------------------------------------------

    def holdings(self, gpu: int | None = None) -> list[tuple[Resident, int | None]]:
        """Each GPU resident of card ``gpu`` (the first by default) with what it measurably
        holds there (None: its backend cannot tell, or it spans several cards)."""
        ctx = self.ctx
        gpu = ctx.first_gpu() if gpu is None else gpu
        backends = ctx.backends
        out: list[tuple[Resident, int | None]] = []
        for r in ctx.cards.ledger(gpu).gpu_residents:
            spans = ctx.several and len(ctx.cards.gpus_of(r.model)) > 1
            out.append((r, None if spans else backends[r.model].measured_bytes(live_only=True)))
        return out

    def accounted_bytes(self, gpu: int | None = None) -> int:
        """What our GPU residents hold: measured where the backend can tell, else what the
        ledger planned. The rest of the device's used memory is foreign."""
        return sum(r.vram_bytes if held is None else held for r, held in self.holdings(gpu))

    def refresh_foreign(self) -> None:
        """Bytes on each card that the ledger does not account for shrink its room; a
        resident measured larger than planned is entered at its measured size."""
        ctx = self.ctx
        for gpu in ctx.cards.indexes:
            accounted = 0
            for r, held in self.holdings(gpu):
                accounted += r.vram_bytes if held is None else held
                if held is not None and held > r.vram_bytes:
                    ctx.cards = ctx.cards.resize(r.model, held, gpu)
                    self.learn(r.model, held, "peak")
                    ctx.emit(
                        "resize",
                        gpu=gpu,
                        model=r.model,
                        bytes_after=held,
                        detail=f"holds {format_gib(held)}, planned at {format_gib(r.vram_bytes)}",
                    )
            foreign = max(0, self.devices[gpu].used_bytes() - accounted)
            if foreign != ctx.cards.ledger(gpu).foreign_bytes:
                ctx.cards = ctx.cards.with_foreign(gpu, foreign)

    def check_room(self, model: str, needed_bytes: int, gpu: int | None = None) -> None:
        """Before a load, the card must really have the room, not only the ledger."""
        ctx = self.ctx
        gpu = ctx.first_gpu() if gpu is None else gpu
        budget = ctx.cards.ledger(gpu).budget_bytes
        device = self.devices[gpu]
        reading = device.read()
        # Room on the card, and room within the budget for everything the card holds (ours,
        # other processes', the driver's): the ledger's rule, checked against the device.
        room = min(reading.free_bytes, budget - reading.used_bytes)
        if room >= needed_bytes:
            return
        raise NoRoom(
            InsufficientVRAM(
                model,
                needed_bytes,
                max(0, room),
                budget,
                reason=f"the device{'' if len(self.devices) == 1 else f' cuda:{gpu}'} has "
                f"{format_gib(reading.free_bytes)} free and "
                f"{format_gib(reading.used_bytes)} in use" + self.foreign_text(reading),
            )
        )

    def foreign_text(self, reading: DeviceReading | None = None) -> str:
        """ "; other processes: ..." naming who else holds memory, or "" when nobody does."""
        others = foreign_processes(reading or self.device.read())
        return f"; other processes: {describe_processes(others)}" if others else ""

    # -- what models take --------------------------------------------------------------------

    def estimate(self, model: str) -> ModelEstimate:
        """What the orchestrator plans with for a model: configured, or learned when larger."""
        return planning_estimate(self.ctx.config.models[model], self.footprints, self.ctx.config)

    def request(self, model: str) -> PlanRequest:
        """What the planner needs to know of a model (or a reservation) to bring it in."""
        ctx = self.ctx
        external = ctx.externals.get(model)
        if external is not None:
            return PlanRequest(model=model, kind=EXTERNAL_KIND, vram_bytes=external.vram_bytes, external=True)
        spec = ctx.config.models[model]
        if spec.tensor_parallel > 1:
            # Its share on each card it spans; a spanning model keeps no host copy.
            share = card_share_bytes(self.estimate(model).estimated_vram_bytes, spec.tensor_parallel)
            return PlanRequest(
                model=model, kind=spec.kind, vram_bytes=share, configured_bytes=spec.card_bytes
            )
        return PlanRequest(
            model=model,
            kind=spec.kind,
            vram_bytes=self.estimate(model).estimated_vram_bytes,
            configured_bytes=spec.vram_bytes,
            offloadable=spec.offload and ctx.backends[model].supports_host_tier,
            host_bytes=spec.host_bytes,
        )

    def learn(self, model: str, measured_bytes: int | None, kind: str) -> None:
        """Keep what a model really took, when it is more than known."""
        ctx = self.ctx
        if not ctx.config.learn_footprints or measured_bytes is None or measured_bytes <= 0:
            return
        old = self.footprints.get(model)
        if old is not None and measured_bytes <= (old.load_bytes if kind == "load" else old.high_water_bytes):
            return
        fp = self.footprints.note(model, measured_bytes, kind=kind)
        self._wake_writer()
        configured = ctx.config.models[model].vram_bytes
        ctx.emit(
            "learn",
            model=model,
            bytes_after=fp.high_water_bytes,
            detail=f"{kind}: measured {format_gib(measured_bytes)}, configured {format_gib(configured)} "
            f"(drift {'+' if measured_bytes >= configured else ''}{format_gib(measured_bytes - configured)})",
        )

    def note_use_peak(self, model: str) -> None:
        """A lease ended: learn the use's peak; a model that outgrew its reservation takes no
        new lease until it has been reloaded at its learned size (once idle)."""
        ctx = self.ctx
        backend = ctx.backends.get(model)
        if backend is None:
            return
        peak = backend.peak_bytes()
        if model in ctx.config.models:
            self.learn(model, peak, "peak")
        r = ctx.cards.get(model)
        if r is not None and r.tier is Tier.GPU and peak is not None and peak > r.vram_bytes:
            ctx.to_unload[model] = "reload at its learned size"
            ctx.wake()

    async def run_writer(self) -> None:
        """Persist learned footprints (and times) from a worker thread whenever some were noted."""
        while True:
            self._dirty = anyio.Event()
            await self.flush()  # what was noted before this loop ran, or since the last flush
            await self._dirty.wait()

    async def flush(self) -> None:
        if self.footprints.pending:
            try:
                await anyio.to_thread.run_sync(self.footprints.flush)
            except OSError as exc:
                logger.warning("cannot write learned footprints to %s: %s", self.footprints.path, exc)
