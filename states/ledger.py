"""The ledger: the one account of what holds VRAM (and pinned host RAM).

A ``Ledger`` is a frozen value. Every change returns a new ledger, so a snapshot handed to a
caller (``orch.ledger()``) can never change under its feet, and the planner can compute "the
ledger after this plan" without touching the real one.

Invariants (kept by the orchestrator, checked by the property tests):

- ``committed_bytes <= budget_bytes`` at all times, unless a resident turns out larger than it
  was planned at (``resize``) or foreign memory grows: then the orchestrator evicts idle
  models until it fits again;
- when a load begins, ``committed_bytes <= available_bytes`` (the budget less foreign memory);
- a model appears at most once, in exactly one tier;
- ``loading`` is not listed among ``residents``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from functools import cached_property

from states.units import format_gib


class Tier(enum.Enum):
    """Where a model's weights are."""

    GPU = "gpu"  # on the device: can serve leases
    HOST = "host"  # a copy in (pinned) host RAM: restoring it is one copy
    DISK = "disk"  # nothing kept: the next use is a cold load


@dataclass(frozen=True)
class Resident:
    """One model that holds memory in some tier."""

    model: str
    kind: str
    vram_bytes: int  # what it holds (or will hold) on the GPU
    tier: Tier = Tier.GPU
    exclusive: bool = False  # a "heavy" kind: never co-resides with another exclusive model
    offloadable: bool = False  # its backend can keep a host copy (Tier.HOST)
    host_bytes: int = 0  # host RAM its host copy takes
    last_used: int = 0  # logical clock: larger means used more recently
    configured_bytes: int = 0  # the config's estimate, when vram_bytes comes from a measurement
    # A reservation for a program outside the orchestrator (a remote lease of raw bytes): it
    # counts against the budget like a model, names no state, and is never evicted (it ends
    # when its lease does).
    external: bool = False

    @property
    def drift_bytes(self) -> int:
        """Planned (measured) minus configured: how far off the config's estimate is."""
        return self.vram_bytes - self.configured_bytes if self.configured_bytes else 0


@dataclass(frozen=True)
class Ledger:
    """Budget, residents and the bytes committed to a load in progress."""

    budget_bytes: int
    residents: tuple[Resident, ...] = ()
    loading: Resident | None = None
    foreign_bytes: int = 0  # held by processes the orchestrator does not own
    host_budget_bytes: int = 0  # room for the HOST tier; 0 disables it
    clock: int = 0  # logical use counter for LRU decisions

    def __post_init__(self) -> None:
        if self.budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {self.budget_bytes}")
        if self.foreign_bytes < 0:
            raise ValueError(f"foreign_bytes must be >= 0, got {self.foreign_bytes}")
        names = [r.model for r in self.residents]
        if len(names) != len(set(names)):
            raise ValueError(f"a model is listed twice in the ledger: {names}")
        if self.loading is not None and self.loading.model in names:
            raise ValueError(f"{self.loading.model!r} is both loading and resident")

    # -- reading ---------------------------------------------------------------------------
    # A ledger never changes (every change is a new one), so what is read most (at every
    # grant, release and event) is computed once per ledger.

    @cached_property
    def gpu_residents(self) -> tuple[Resident, ...]:
        return tuple(r for r in self.residents if r.tier is Tier.GPU)

    @cached_property
    def host_residents(self) -> tuple[Resident, ...]:
        return tuple(r for r in self.residents if r.tier is Tier.HOST)

    @cached_property
    def resident_bytes(self) -> int:
        """VRAM held by models on the GPU."""
        return sum(r.vram_bytes for r in self.gpu_residents)

    @property
    def external_bytes(self) -> int:
        """VRAM reserved for external programs (part of ``resident_bytes``)."""
        return sum(r.vram_bytes for r in self.gpu_residents if r.external)

    @cached_property
    def committed_bytes(self) -> int:
        """VRAM held by residents plus the bytes promised to the load in progress."""
        loading = self.loading.vram_bytes if self.loading is not None else 0
        return self.resident_bytes + loading

    @property
    def available_bytes(self) -> int:
        """The budget less what foreign processes hold (never below zero)."""
        return max(0, self.budget_bytes - self.foreign_bytes)

    @property
    def free_bytes(self) -> int:
        return max(0, self.available_bytes - self.committed_bytes)

    @property
    def host_used_bytes(self) -> int:
        return sum(r.host_bytes for r in self.host_residents)

    def get(self, model: str) -> Resident | None:
        for r in self.residents:
            if r.model == model:
                return r
        return None

    def tier_of(self, model: str) -> Tier:
        r = self.get(model)
        return r.tier if r is not None else Tier.DISK

    def on_gpu(self, model: str) -> bool:
        return self.tier_of(model) is Tier.GPU

    def fits(self) -> bool:
        """The VRAM precondition: what is committed fits in the room there is."""
        return self.committed_bytes <= self.available_bytes

    def describe(self) -> str:
        """One line for messages: who holds what."""
        if not self.gpu_residents and self.loading is None:
            held = "nothing resident"
        else:
            parts = [f"{r.model} ({format_gib(r.vram_bytes)})" for r in self.gpu_residents]
            if self.loading is not None:
                parts.append(f"{self.loading.model} loading ({format_gib(self.loading.vram_bytes)})")
            held = ", ".join(parts)
        foreign = f", foreign processes {format_gib(self.foreign_bytes)}" if self.foreign_bytes else ""
        return f"{held}{foreign}; budget {format_gib(self.budget_bytes)}"

    # -- changing (each returns a new ledger) ----------------------------------------------

    def begin_load(self, resident: Resident) -> Ledger:
        """Commit bytes to a load. The model leaves any lower tier it was in."""
        if self.loading is not None:
            raise ValueError(f"a load of {self.loading.model!r} is already in progress")
        rest = tuple(r for r in self.residents if r.model != resident.model)
        return replace(self, residents=rest, loading=replace(resident, tier=Tier.GPU))

    def finish_load(self, vram_bytes: int | None = None) -> Ledger:
        """The load in progress succeeded: the model becomes a GPU resident."""
        if self.loading is None:
            raise ValueError("no load in progress")
        clock = self.clock + 1
        done = replace(self.loading, last_used=clock)
        if vram_bytes is not None:
            done = replace(done, vram_bytes=vram_bytes)
        return replace(self, residents=(*self.residents, done), loading=None, clock=clock)

    def abort_load(self) -> Ledger:
        """The load in progress failed and was cleaned up: its bytes are free again."""
        return replace(self, loading=None)

    def move(self, model: str, tier: Tier) -> Ledger:
        """A model went to another tier (DISK removes it from the ledger)."""
        r = self.get(model)
        if r is None:
            raise ValueError(f"{model!r} is not in the ledger")
        if tier is Tier.DISK:
            return replace(self, residents=tuple(x for x in self.residents if x.model != model))
        return replace(
            self,
            residents=tuple(replace(x, tier=tier) if x.model == model else x for x in self.residents),
        )

    def touch(self, model: str) -> Ledger:
        """Record a use (for least-recently-used decisions)."""
        r = self.get(model)
        if r is None or (r.last_used == self.clock and self.clock > 0):
            return self  # unknown, or already the most recent: nothing changes
        clock = self.clock + 1
        return replace(
            self,
            residents=tuple(replace(x, last_used=clock) if x.model == model else x for x in self.residents),
            clock=clock,
        )

    def resize(self, model: str, vram_bytes: int) -> Ledger:
        """A resident was measured at another size than it was planned at."""
        if self.get(model) is None:
            raise ValueError(f"{model!r} is not in the ledger")
        if vram_bytes < 0:
            raise ValueError(f"vram_bytes must be >= 0, got {vram_bytes}")
        return replace(
            self,
            residents=tuple(
                replace(x, vram_bytes=vram_bytes) if x.model == model else x for x in self.residents
            ),
        )

    def with_foreign(self, foreign_bytes: int) -> Ledger:
        return replace(self, foreign_bytes=max(0, foreign_bytes))
