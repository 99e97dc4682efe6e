"""Which card serves a model: pure placement over the machine's ``Cards``.

``place()`` answers for one model, in this order (the first rule that applies decides):

1. the cards where the model is resident, or loading, or where a running switch is about to
   load it (a spanning model: all of them);
2. a host copy that cannot move (its backend keeps it in a process bound to one card, as a
   sleeping vLLM server does) restores only onto its own card;
3. otherwise every allowed card (``gpus:`` in the model's config, else all) where the model
   fits the budget is scored by what placing it there costs now, and the best wins:
   a card that is in the middle of a switch last; then a plan over one that waits for
   foreign memory; then the fewest evictions of models in use (each would have to drain);
   then the cheapest switch (``plan_cost_s``: the evictions' unloads, and the load or the
   restore: a host copy restores onto any card at its restore cost); then the fewest bytes
   evicted; then the card used least recently. A model spanning ``k`` cards takes the best
   ``k`` (its share on each).

A model too large for every allowed card gets ``InsufficientVRAM`` naming the largest one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from states.cards import Cards
from states.errors import InsufficientVRAM
from states.ledger import Ledger
from states.plan import Deferred, PlanRequest, Policy, SwitchCosts, plan, plan_cost_s

_UNPLANNABLE = 1 << 62  # a score part for a card that cannot be planned on now


@dataclass(frozen=True)
class Placement:
    """The cards that serve ``model`` (one, or the ``k`` it spans), and why."""

    model: str
    gpus: tuple[int, ...]
    why: str  # "resident", "host copy", "room"
    score: tuple[float, ...] = ()  # the winning card's score (rule 3); () when rule 1 or 2 decided

    @property
    def anchor(self) -> int:
        """The card whose step decides for the model (its first card)."""
        return self.gpus[0]


@dataclass(frozen=True)
class PlaceContext:
    """What placement reads besides the cards: restrictions, spans, what is in use."""

    policy: Policy = field(default_factory=Policy)
    allowed: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # model -> cards
    spans: Mapping[str, int] = field(default_factory=dict)  # model -> cards it spans (>1)
    portable: frozenset[str] = frozenset()  # host copies that may restore onto another card
    busy: frozenset[int] = frozenset()  # cards with a switch in progress
    leases: Mapping[str, int] = field(default_factory=dict)
    costs: Mapping[str, SwitchCosts] = field(default_factory=dict)  # learned; absent: the defaults
    loading: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # targets of running switches
    used_s: Mapping[int, float] = field(default_factory=dict)  # when each card last granted a lease


def allowed_gpus(cards: Cards, model: str, ctx: PlaceContext) -> tuple[int, ...]:
    only = ctx.allowed.get(model)
    return tuple(g for g in cards.indexes if only is None or g in only)


def score(request: PlanRequest, ledger: Ledger, gpu: int, ctx: PlaceContext) -> tuple[float, ...] | None:
    """What placing ``request`` on card ``gpu`` (its planning view ``ledger``) costs now,
    smaller is better; None: it can never fit there."""
    if request.vram_bytes > ledger.budget_bytes:
        return None
    used_s = ctx.used_s.get(gpu, float("-inf"))  # ties: the card used least recently
    busy = 1 if gpu in ctx.busy or ledger.loading is not None else 0
    if busy:
        # No plan while the card switches: ranked after every card that can plan now, by room.
        return (1, 0, 0, 0, ledger.committed_bytes, used_s)
    try:
        p = plan(request, ledger, ctx.policy)
    except (InsufficientVRAM, ValueError):
        return None
    if isinstance(p, Deferred):
        return (0, 1, 0, 0, p.needed_bytes - p.available_bytes, used_s)
    in_use = sum(1 for e in p.gpu_evictions if ctx.leases.get(e.model, 0))
    evicted = sum(r.vram_bytes for e in p.gpu_evictions if (r := ledger.get(e.model)) is not None)
    return (0, 0, in_use, round(plan_cost_s(p, ctx.costs) * 1000), evicted, used_s)


def place(
    request: PlanRequest, cards: Cards, ctx: PlaceContext, views: Mapping[int, Ledger] | None = None
) -> Placement:
    """The cards that serve ``request.model`` (see the module docstring).

    ``views`` are the cards' planning views (``Cards.view`` with what running switches hold
    back); by default ``Cards.view``.

    :raises InsufficientVRAM: the model fits no card it may use.
    """
    model = request.model
    k = max(1, ctx.spans.get(model, 1))
    where = cards.gpus_of(model) or ctx.loading.get(model, ())
    if where:
        return Placement(model, where, "resident")
    allowed = allowed_gpus(cards, model, ctx)
    host = cards.host_gpu(model)
    if host is not None and model not in ctx.portable and k == 1 and host in allowed:
        return Placement(model, (host,), "host copy")
    scored: list[tuple[tuple[float, ...], int]] = []
    for gpu in allowed:
        led = views[gpu] if views is not None else cards.view(gpu)
        s = score(request, led, gpu, ctx)
        if s is not None:
            scored.append((s, gpu))
    if len(scored) < k:
        raise _too_large(request, cards, allowed, k)
    scored.sort()
    chosen = tuple(sorted(g for _, g in scored[:k]))
    return Placement(model, chosen, "host copy" if host is not None else "room", scored[k - 1][0])


def _too_large(request: PlanRequest, cards: Cards, allowed: tuple[int, ...], k: int) -> InsufficientVRAM:
    budgets = sorted(((cards.ledger(g).budget_bytes, g) for g in allowed), reverse=True)
    if not budgets:
        return InsufficientVRAM(
            request.model,
            request.vram_bytes,
            0,
            0,
            reason=f"its gpus: list names no card of this machine (the cards are {list(cards.indexes)})",
            advice="name cards the machine has in models.<name>.gpus",
        )
    largest, gpu = budgets[0]
    if k > 1:
        return InsufficientVRAM(
            request.model,
            request.vram_bytes,
            largest,
            largest,
            reason=f"it spans {k} cards and only {sum(1 for b, _ in budgets if b >= request.vram_bytes)} "
            f"of the {len(budgets)} it may use can hold its share",
            advice="lower tensor_parallel, or allow more cards in models.<name>.gpus",
        )
    return InsufficientVRAM(
        request.model,
        request.vram_bytes,
        largest,
        largest,
        reason=f"it fits no card: the largest it may use is cuda:{gpu}",
    )


def hide_in_flight(ledger: Ledger, models: frozenset[str], host_pending_bytes: int) -> Ledger:
    """A card's planning view without the host copies that running switches restore or
    drop (no other plan may touch them meanwhile), and without the host room those switches
    will fill."""
    hidden = [r for r in ledger.host_residents if r.model in models]
    if not hidden and not host_pending_bytes:
        return ledger
    kept = tuple(r for r in ledger.residents if r not in hidden)
    room = max(0, ledger.host_budget_bytes - sum(r.host_bytes for r in hidden) - host_pending_bytes)
    return replace(ledger, residents=kept, host_budget_bytes=room)
