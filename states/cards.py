"""Several GPUs: one ledger per card, one shared host tier, as one frozen value.

``Cards`` holds a ``Ledger`` per card (each with its own budget, foreign memory and load in
progress) and is the one account of the whole machine. Every change returns a new value, as a
``Ledger``'s do. A single-GPU machine is a ``Cards`` of one card, and behaves exactly as its
ledger.

The host tier (pinned host RAM) is shared by every card under one host budget: a host copy is
kept in the ledger of the card it left, and ``view(gpu)`` shows a card's ledger with every
host copy of the machine, which is what planning on that card needs (a model offloaded from
card 0 may be restored onto card 1; keeping room in the host tier counts every card's copies).

A model spanning several cards (tensor parallel) is resident on each of them with its share
of the bytes, and is moved, touched and evicted on all of them together.

Invariants (checked by the property tests):

- on every card, ``committed_bytes <= budget_bytes`` as for one ledger;
- a model is on the GPU of exactly its cards (one, or all the cards it spans) or of none;
- a model has at most one host copy, on the machine as a whole;
- the host copies of all cards together fit the one host budget.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

from states.ledger import Ledger, Resident, Tier


@dataclass(frozen=True)
class Card:
    """One GPU: its device index (as NVML and CUDA number it) and its name."""

    index: int
    name: str = ""

    @property
    def label(self) -> str:
        return f"cuda:{self.index}" + (f" ({self.name})" if self.name else "")


@dataclass(frozen=True)
class Cards:
    """A ledger per card, in the order of ``cards``."""

    cards: tuple[Card, ...]
    ledgers: tuple[Ledger, ...]

    def __post_init__(self) -> None:
        if not self.cards:
            raise ValueError("a machine has at least one card")
        if len(self.cards) != len(self.ledgers):
            raise ValueError(f"{len(self.cards)} cards but {len(self.ledgers)} ledgers")
        indexes = [c.index for c in self.cards]
        if len(indexes) != len(set(indexes)):
            raise ValueError(f"a card is listed twice: {indexes}")
        hosted = [r.model for led in self.ledgers for r in led.host_residents]
        if len(hosted) != len(set(hosted)):
            raise ValueError(f"a model has two host copies: {sorted(hosted)}")

    @classmethod
    def single(cls, ledger: Ledger, card: Card | None = None) -> Cards:
        return cls((card or Card(0),), (ledger,))

    @classmethod
    def of(cls, budgets: Sequence[tuple[Card, int]], host_budget_bytes: int = 0) -> Cards:
        """Empty ledgers: each card with its budget, the host budget shared."""
        return cls(
            tuple(c for c, _ in budgets),
            tuple(Ledger(budget_bytes=b, host_budget_bytes=host_budget_bytes) for _, b in budgets),
        )

    # -- the cards -------------------------------------------------------------------------

    @property
    def indexes(self) -> tuple[int, ...]:
        return tuple(c.index for c in self.cards)

    def __len__(self) -> int:
        return len(self.cards)

    def __iter__(self) -> Iterator[tuple[Card, Ledger]]:
        return iter(zip(self.cards, self.ledgers, strict=True))

    def _pos(self, gpu: int) -> int:
        for i, c in enumerate(self.cards):
            if c.index == gpu:
                return i
        raise KeyError(f"no card cuda:{gpu} (the cards are {list(self.indexes)})")

    def card(self, gpu: int) -> Card:
        return self.cards[self._pos(gpu)]

    def ledger(self, gpu: int) -> Ledger:
        """Card ``gpu``'s own ledger (its GPU residents, its load, the host copies it left)."""
        return self.ledgers[self._pos(gpu)]

    def view(self, gpu: int) -> Ledger:
        """Card ``gpu``'s ledger with every host copy of the machine: what planning sees."""
        own = self.ledger(gpu)
        if len(self.cards) == 1:
            return own
        others = tuple(r for c, led in self if c.index != gpu for r in led.host_residents)
        return replace(own, residents=own.residents + others)

    # -- reading (machine-wide) --------------------------------------------------------------

    def gpus_of(self, model: str) -> tuple[int, ...]:
        """The cards whose GPU holds ``model`` or loads it (none, one, or all it spans)."""
        return tuple(
            c.index
            for c, led in self
            if led.on_gpu(model) or (led.loading is not None and led.loading.model == model)
        )

    def host_gpu(self, model: str) -> int | None:
        """The card whose ledger keeps ``model``'s host copy (the card it left)."""
        for c, led in self:
            if led.tier_of(model) is Tier.HOST:
                return c.index
        return None

    def get(self, model: str) -> Resident | None:
        """``model``'s entry (for a spanning model: its share on its first card)."""
        for led in self.ledgers:
            r = led.get(model)
            if r is not None:
                return r
        return None

    def tier_of(self, model: str) -> Tier:
        r = self.get(model)
        return r.tier if r is not None else Tier.DISK

    def on_gpu(self, model: str) -> bool:
        return any(led.on_gpu(model) for led in self.ledgers)

    def loading_on(self, gpu: int) -> Resident | None:
        return self.ledger(gpu).loading

    @property
    def gpu_residents(self) -> tuple[Resident, ...]:
        """Every GPU resident of every card (a spanning model once per card)."""
        return tuple(r for led in self.ledgers for r in led.gpu_residents)

    @property
    def host_residents(self) -> tuple[Resident, ...]:
        return tuple(r for led in self.ledgers for r in led.host_residents)

    @property
    def residents(self) -> tuple[Resident, ...]:
        return self.gpu_residents + self.host_residents

    @cached_property  # the cards never change (see Ledger)
    def committed_bytes(self) -> int:
        return sum(led.committed_bytes for led in self.ledgers)

    @property
    def budget_bytes(self) -> int:
        return sum(led.budget_bytes for led in self.ledgers)

    @property
    def foreign_bytes(self) -> int:
        return sum(led.foreign_bytes for led in self.ledgers)

    @property
    def host_used_bytes(self) -> int:
        return sum(r.host_bytes for r in self.host_residents)

    @property
    def host_budget_bytes(self) -> int:
        return self.ledgers[0].host_budget_bytes

    def fits(self) -> bool:
        """Every card's committed bytes fit its room."""
        return all(led.fits() for led in self.ledgers)

    def describe(self) -> str:
        if len(self.cards) == 1:
            return self.ledgers[0].describe()
        return "; ".join(f"{c.label}: {led.describe()}" for c, led in self)

    def summary(self) -> Ledger:
        """The machine as one ledger, for readers that show totals (budgets, foreign and
        committed bytes summed; a spanning model once, with its bytes summed). With one card:
        its ledger. With loads on several cards, ``loading`` stands for all of them."""
        if len(self.cards) == 1:
            return self.ledgers[0]
        gpu: dict[str, Resident] = {}
        for r in self.gpu_residents:
            old = gpu.get(r.model)
            gpu[r.model] = r if old is None else replace(old, vram_bytes=old.vram_bytes + r.vram_bytes)
        loads = [led.loading for led in self.ledgers if led.loading is not None]
        loading: Resident | None = None
        if loads:
            names = sorted({r.model for r in loads})
            loading = replace(loads[0], model=", ".join(names), vram_bytes=sum(r.vram_bytes for r in loads))
            gpu = {m: r for m, r in gpu.items() if m not in names}
        return Ledger(
            budget_bytes=self.budget_bytes,
            residents=tuple(gpu.values()) + self.host_residents,
            loading=loading,
            foreign_bytes=self.foreign_bytes,
            host_budget_bytes=self.host_budget_bytes,
            clock=max(led.clock for led in self.ledgers),
        )

    # -- changing (each returns a new value) ---------------------------------------------------

    def _with(self, gpu: int, ledger: Ledger) -> Cards:
        pos = self._pos(gpu)
        return replace(self, ledgers=(*self.ledgers[:pos], ledger, *self.ledgers[pos + 1 :]))

    def _each(self, model: str, change: str, *args: object) -> Cards:
        """Apply a ledger change to every card that lists ``model``."""
        found = changed = False
        out: list[Ledger] = []
        for led in self.ledgers:
            if led.get(model) is not None:
                found = True
                new = getattr(led, change)(model, *args)
                changed = changed or new is not led
                led = new
            out.append(led)
        if not found:
            raise ValueError(f"{model!r} is not in the ledger")
        # A change that changed nothing (a touch of the most recently used model: every grant
        # and release of a busy one) keeps these cards, as the ledger keeps itself.
        return replace(self, ledgers=tuple(out)) if changed else self

    def with_ledger(self, gpu: int, ledger: Ledger) -> Cards:
        """Card ``gpu``'s ledger replaced."""
        return self._with(gpu, ledger)

    def with_view(self, gpu: int, view: Ledger) -> Cards:
        """Card ``gpu``'s planning view (``view(gpu)``) as a pure rule changed it, brought back
        to the card's own ledger: its GPU residents, load and foreign memory from the view, the
        other cards' host copies left where they are."""
        own = self.ledger(gpu)
        others = {r.model for r in view.host_residents} - {r.model for r in own.host_residents}
        return self._with(
            gpu, replace(view, residents=tuple(r for r in view.residents if r.model not in others))
        )

    def begin_load(self, gpu: int, resident: Resident) -> Cards:
        """Commit ``resident``'s bytes on card ``gpu``. The model leaves any lower tier it was
        in, on whichever card's ledger kept it (a host copy restored onto another card)."""
        out = self
        for c, led in self:
            if c.index != gpu and led.get(resident.model) is not None:
                if led.on_gpu(resident.model):
                    raise ValueError(f"{resident.model!r} is already on cuda:{c.index}")
                out = out._with(c.index, led.move(resident.model, Tier.DISK))
        return out._with(gpu, out.ledger(gpu).begin_load(resident))

    def finish_load(self, gpu: int, vram_bytes: int | None = None) -> Cards:
        return self._with(gpu, self.ledger(gpu).finish_load(vram_bytes))

    def abort_load(self, gpu: int) -> Cards:
        return self._with(gpu, self.ledger(gpu).abort_load())

    def move(self, model: str, tier: Tier) -> Cards:
        """``model`` went to another tier on every card that holds it. A spanning model's host
        copy is kept once (by its first card)."""
        out = self._each(model, "move", tier)
        if tier is Tier.HOST:
            holders = [c.index for c, led in out if led.tier_of(model) is Tier.HOST]
            for gpu in holders[1:]:
                out = out._with(gpu, out.ledger(gpu).move(model, Tier.DISK))
        return out

    def touch(self, model: str) -> Cards:
        if self.get(model) is None:
            return self
        return self._each(model, "touch")

    def resize(self, model: str, vram_bytes: int, gpu: int | None = None) -> Cards:
        """A resident was measured at another size (on card ``gpu``; all its cards if None)."""
        if gpu is not None:
            return self._with(gpu, self.ledger(gpu).resize(model, vram_bytes))
        return self._each(model, "resize", vram_bytes)

    def with_foreign(self, gpu: int, foreign_bytes: int) -> Cards:
        return self._with(gpu, self.ledger(gpu).with_foreign(foreign_bytes))

    def with_budget(self, gpu: int, budget_bytes: int) -> Cards:
        return self._with(gpu, replace(self.ledger(gpu), budget_bytes=budget_bytes))
