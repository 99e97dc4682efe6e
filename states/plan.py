"""Planning a switch: a pure function from (request, ledger, policy) to what to do.

``plan()`` decides; it performs no IO. The orchestrator's executor carries the plan out
through the backends and updates the ledger after each step succeeds (deciding apart from
doing, as httpcore's connection pool does).

The rules:

1. A model larger than the whole budget can never load: ``InsufficientVRAM`` at once.
2. Exclusive ("heavy") kinds never co-reside: loading one evicts every other exclusive
   model on the GPU.
3. Then, while the request does not fit, evict more: light models before heavy ones, least
   recently used first; external reservations last (they cannot be unloaded, only waited
   for: their leases end). Of those, any that a later, larger one made unnecessary stays.
4. If it still does not fit, the missing room is held by foreign processes: the request is
   ``Deferred`` (the orchestrator waits for room or times out), not failed.
5. An evicted model goes to the HOST tier when its backend can keep a host copy and the host
   budget has room (dropping the least recently used host copies if that makes room for a
   more recently used model); otherwise it is dropped (DISK).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from states.errors import InsufficientVRAM
from states.ledger import Ledger, Resident, Tier
from states.units import format_gib


@dataclass(frozen=True)
class SwitchCosts:
    """What bringing a model in and taking it out costs, in seconds (measured, or estimated
    until measured)."""

    load_s: float = 10.0  # a cold load from disk
    restore_s: float = 1.0  # from its host copy
    unload_s: float = 1.0  # unloading it (off the GPU, no host copy kept)
    offload_s: float = 0.1  # offloading it to its host copy (the device copy freed)


@dataclass(frozen=True)
class Policy:
    """Which kinds are exclusive. Kinds not listed as exclusive are light."""

    exclusive_kinds: frozenset[str] = frozenset({"llm", "sdxl"})

    def is_exclusive(self, kind: str) -> bool:
        return kind in self.exclusive_kinds


@dataclass(frozen=True)
class PlanRequest:
    """A model to bring onto the GPU."""

    model: str
    kind: str
    vram_bytes: int
    offloadable: bool = False
    host_bytes: int = 0
    configured_bytes: int = 0  # the config's estimate, when vram_bytes is a learned figure
    external: bool = False  # a reservation for a program outside the orchestrator


@dataclass(frozen=True)
class Eviction:
    """Move ``model`` from ``from_tier`` down to ``to_tier``."""

    model: str
    from_tier: Tier
    to_tier: Tier


@dataclass(frozen=True)
class Plan:
    """Evict these (in order), then load ``load`` from ``from_tier``.

    ``after`` is the ledger once the evictions are done and the load's bytes committed; the
    state machine's guard checks it before the switch begins.
    """

    load: str
    load_bytes: int
    from_tier: Tier
    evictions: tuple[Eviction, ...]
    after: Ledger

    @property
    def gpu_evictions(self) -> tuple[Eviction, ...]:
        return tuple(e for e in self.evictions if e.from_tier is Tier.GPU)


@dataclass(frozen=True)
class Deferred:
    """The request fits the budget but not the room foreign processes leave now."""

    model: str
    needed_bytes: int
    available_bytes: int
    foreign_bytes: int

    @property
    def reason(self) -> str:
        return (
            f"{self.model!r} needs {format_gib(self.needed_bytes)} but other processes hold "
            f"{format_gib(self.foreign_bytes)}, leaving {format_gib(self.available_bytes)} "
            "even with everything of ours unloaded"
        )


def plan(request: PlanRequest, ledger: Ledger, policy: Policy) -> Plan | Deferred:
    """Decide how to bring ``request.model`` onto the GPU.

    :raises InsufficientVRAM: the model is larger than the whole budget.
    :raises ValueError: the model is already on the GPU or a load is in progress (the
        caller's bug: the scheduler plans only for models that are not resident).
    """
    if request.vram_bytes > ledger.budget_bytes:
        raise InsufficientVRAM(request.model, request.vram_bytes, ledger.budget_bytes, ledger.budget_bytes)
    if ledger.on_gpu(request.model):
        raise ValueError(f"{request.model!r} is already on the GPU")
    if ledger.loading is not None:
        raise ValueError(f"a load of {ledger.loading.model!r} is already in progress")

    exclusive = policy.is_exclusive(request.kind) and not request.external
    victims: list[Resident] = []
    keep: list[Resident] = []
    for r in ledger.gpu_residents:
        (victims if exclusive and r.exclusive else keep).append(r)

    room = ledger.available_bytes - sum(r.vram_bytes for r in keep)
    chosen = choose_victims(keep, room, request.vram_bytes)
    if chosen is None:
        return Deferred(request.model, request.vram_bytes, ledger.available_bytes, ledger.foreign_bytes)
    victims += chosen

    evictions = _choose_tiers(victims, ledger, request)
    after = ledger
    for e in evictions:
        after = after.move(e.model, e.to_tier)
    from_tier = ledger.tier_of(request.model)
    after = after.begin_load(
        Resident(
            model=request.model,
            kind=request.kind,
            vram_bytes=request.vram_bytes,
            exclusive=exclusive,
            offloadable=request.offloadable,
            host_bytes=request.host_bytes,
            configured_bytes=request.configured_bytes,
            external=request.external,
        )
    )
    return Plan(
        load=request.model,
        load_bytes=request.vram_bytes,
        from_tier=from_tier,
        evictions=evictions,
        after=after,
    )


def victim_order(residents: Iterable[Resident]) -> list[Resident]:
    """The one order in which residents are given up: light before heavy, least recently
    used first, external reservations last (rule 3). Rebalancing uses it too."""
    return sorted(residents, key=lambda r: (r.external, r.exclusive, r.last_used))


def choose_victims(
    candidates: Iterable[Resident], room_bytes: int, needed_bytes: int
) -> list[Resident] | None:
    """Which of ``candidates`` to evict so that ``room_bytes`` (the room with all of them
    still resident) grows to ``needed_bytes``: taken in ``victim_order``, then any that a
    later, larger one made unnecessary is kept (the TTS picked first, then the LLM, whose
    room alone was enough). ``None`` when even all of them are not enough."""
    order = victim_order(candidates)
    chosen: list[Resident] = []
    while room_bytes < needed_bytes and order:
        r = order.pop(0)
        chosen.append(r)
        room_bytes += r.vram_bytes
    if room_bytes < needed_bytes:
        return None
    for r in reversed(chosen[:-1]):
        if room_bytes - r.vram_bytes >= needed_bytes:
            chosen.remove(r)
            room_bytes -= r.vram_bytes
    return chosen


def _choose_tiers(victims: list[Resident], ledger: Ledger, request: PlanRequest) -> tuple[Eviction, ...]:
    """Send victims to HOST where the host budget allows, keeping the most recent copies."""
    # The requested model leaves the host tier when it is restored from there.
    host_now = [r for r in ledger.host_residents if r.model != request.model]
    candidates = host_now + [v for v in victims if v.offloadable and v.host_bytes > 0 and not v.external]
    candidates.sort(key=lambda r: r.last_used, reverse=True)
    kept: set[str] = set()
    used = 0
    for r in candidates:
        if used + r.host_bytes <= ledger.host_budget_bytes:
            kept.add(r.model)
            used += r.host_bytes
    out: list[Eviction] = []
    # Free host room first (dropping older host copies), then move GPU victims down.
    for r in host_now:
        if r.model not in kept:
            out.append(Eviction(r.model, Tier.HOST, Tier.DISK))
    for v in victims:
        out.append(Eviction(v.model, Tier.GPU, Tier.HOST if v.model in kept else Tier.DISK))
    return tuple(out)


def plan_cost_s(p: Plan, costs: Mapping[str, SwitchCosts]) -> float:
    """What carrying out ``p`` costs: its GPU evictions' unloads (or offloads, for those that
    keep a host copy), then its load or restore (a model without a figure in ``costs``: the
    defaults of ``SwitchCosts``)."""
    default = SwitchCosts()

    def out_s(e: Eviction) -> float:
        c = costs.get(e.model, default)
        return c.offload_s if e.to_tier is Tier.HOST else c.unload_s

    target = costs.get(p.load, default)
    out = sum(out_s(e) for e in p.gpu_evictions)
    return out + (target.restore_s if p.from_tier is Tier.HOST else target.load_s)
