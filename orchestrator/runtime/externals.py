"""Reservations of raw VRAM for programs outside the orchestrator (``orch.reserve()``).

A reservation waits in the queue like any acquire and, once granted, is a resident of the
ledger named by its id, with a stand-in backend that moves no bytes. When its lease ends its
bytes leave the ledger at once (or, during a switch, once the switch is over).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from orchestrator.device.base import Device
from orchestrator.monitor import foreign_processes
from orchestrator.runtime.context import Context
from orchestrator.runtime.lease import ExternalBackend, ExternalReservation
from states.ledger import Tier
from states.units import format_gib

logger = logging.getLogger("orchestrator")


class Externals:
    def __init__(self, ctx: Context, devices: Mapping[int, Device]) -> None:
        self.ctx = ctx
        self.devices = dict(devices)  # one per card
        self.device = self.devices[ctx.first_gpu()]
        self._seq = 0
        self._overusing: set[str] = set()  # ids whose program was seen using more than reserved

    def create(self, n_bytes: int, pid: int | None, holder: str) -> ExternalReservation:
        ctx = self.ctx
        self._seq += 1
        reservation = ExternalReservation(f"external-{self._seq}", n_bytes, pid, holder, ctx.now_s())
        ctx.externals[reservation.id] = reservation
        ctx.backends[reservation.id] = ExternalBackend(reservation)
        return reservation

    def end(self, rid: str) -> None:
        """The reservation's lease ended (or it never got one): its bytes leave the ledger."""
        ctx = self.ctx
        ctx.externals.pop(rid, None)
        self._overusing.discard(rid)
        planned = ctx.cards.get(rid) is not None or bool(ctx.cards.gpus_of(rid))
        if ctx.switching:
            # A switch is under way (perhaps the one that admits this very reservation): the
            # scheduler drops it once that switch is over (a requested unload).
            ctx.to_unload[rid] = "external reservation ended"
            ctx.wake()
            return
        if planned:
            gpu = ctx.gpus_of(rid)[0]
            before = ctx.cards.ledger(gpu).committed_bytes
            ctx.cards = ctx.cards.move(rid, Tier.DISK)
            ctx.emit(
                "external_end",
                gpu=gpu,
                model=rid,
                bytes_before=before,
                bytes_after=ctx.cards.ledger(gpu).committed_bytes,
                detail="reservation ended: its bytes are free for our models again",
            )
            ctx.wake()
        backend = ctx.backends.pop(rid, None)
        if isinstance(backend, ExternalBackend):
            backend.end()

    def forget_ended(self) -> None:
        """Drop the stand-ins of reservations that ended during a switch, once unloaded."""
        ctx = self.ctx
        for name in [n for n, b in ctx.backends.items() if isinstance(b, ExternalBackend)]:
            if name not in ctx.externals and ctx.cards.get(name) is None and name not in ctx.to_unload:
                del ctx.backends[name]

    def check_usage(self) -> list[tuple[ExternalReservation, int]]:
        """(reservation, bytes its program uses now) for each held reservation with a pid.

        A program seen using more than it reserved gets an ``external_overuse`` event (once
        per episode); its memory beyond the reservation counts as foreign meanwhile, so the
        budget stays safe, but our models may have to wait or be evicted for it.
        """
        ctx = self.ctx
        held = [r for r in ctx.externals.values() if r.pid is not None and ctx.cards.on_gpu(r.id)]
        if not held:
            return []
        readings: dict[int, dict[int, int]] = {}
        out = []
        for r in held:
            assert r.pid is not None
            gpu = ctx.gpus_of(r.id)[0]
            if gpu not in readings:
                readings[gpu] = dict(foreign_processes(self.devices.get(gpu, self.device).read()))
            used = readings[gpu].get(r.pid, 0)
            out.append((r, used))
            if used > r.vram_bytes and r.id not in self._overusing:
                self._overusing.add(r.id)
                logger.warning(
                    "external program pid %d uses %s, more than its reservation %s of %s",
                    r.pid, format_gib(used), r.id, format_gib(r.vram_bytes),
                )  # fmt: skip
                ctx.emit(
                    "external_overuse",
                    model=r.id,
                    bytes_after=used,
                    detail=f"pid {r.pid} uses {format_gib(used)}, reserved {format_gib(r.vram_bytes)} "
                    f"(over by {format_gib(used - r.vram_bytes)})",
                )
            elif used <= r.vram_bytes:
                self._overusing.discard(r.id)
        return out
