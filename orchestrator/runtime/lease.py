"""What a granted acquire() hands out: a ``Lease``; and what reserve() holds: an
``ExternalReservation`` with its stand-in backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.backends.base import Backend
from orchestrator.errors import LeaseEnded
from states.cards import Card
from states.ledger import Tier

EXTERNAL_KIND = "external"  # the kind of a reservation for a program outside the orchestrator


class Lease:
    """A granted slot on a resident model. ``handle`` is the backend's live object.

    The lease lets go of the handle when its block ends: a lease object kept past its block
    (a variable, a list of results) must not keep a pipeline, and its GPU memory, alive after
    the model is evicted. ``handle`` then raises ``LeaseEnded``.
    """

    __slots__ = ("_handle", "devices", "ended", "kind", "model", "priority", "waited_s")

    def __init__(
        self,
        model: str,
        kind: str,
        handle: Any,
        waited_s: float,
        priority: int,
        devices: tuple[Card, ...] = (),
    ) -> None:
        self.model, self.kind, self.waited_s, self.priority = model, kind, waited_s, priority
        self._handle = handle
        self.ended = False
        self.devices = devices  # the card(s) that serve it, first card first

    @property
    def device(self) -> Card | None:
        """The card that serves it (its index and name; a spanning model's first card)."""
        return self.devices[0] if self.devices else None

    @property
    def handle(self) -> Any:
        if self.ended:
            raise LeaseEnded(self.model)
        return self._handle

    def _end(self) -> None:
        self._handle = None
        self.ended = True

    def __repr__(self) -> str:
        state = "ended" if self.ended else "held"
        return f"Lease(model={self.model!r}, kind={self.kind!r}, {state}, waited_s={self.waited_s:.3f})"


@dataclass(frozen=True)
class ExternalReservation:
    """VRAM reserved for a program outside the orchestrator (``orch.reserve()``).

    It is in the ledger as a resident named ``id`` while its lease is held: the planner makes
    room for it by evicting our models, and the budget invariant covers it. ``pid``, when
    given, is the program whose real use on the device is checked against ``vram_bytes``.
    """

    id: str
    vram_bytes: int
    pid: int | None
    holder: str
    created_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "vram_bytes": self.vram_bytes,
            "pid": self.pid,
            "holder": self.holder,
            "created_s": self.created_s,
        }


class ExternalBackend(Backend):
    """An external reservation's stand-in: loading it moves no bytes (the program allocates
    its own memory); what it really uses is checked by pid (``check_external_usage``)."""

    def __init__(self, reservation: ExternalReservation) -> None:
        super().__init__(reservation.id, EXTERNAL_KIND, reservation.vram_bytes)
        self.reservation = reservation

    async def load(self, limit_bytes: int | None = None) -> Any:
        self._tier = Tier.GPU
        self._handle = self.reservation
        return self.reservation

    async def unload(self) -> None:
        self._handle = None
        self._tier = Tier.DISK

    def end(self) -> None:
        """The reservation's lease ended: the program's bytes are no longer ours to hold."""
        self._handle = None
        self._tier = Tier.DISK
