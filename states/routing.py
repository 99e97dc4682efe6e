"""Routing across machines: a pure function from (request, each machine's snapshot) to the
machine that should serve it.

A cluster runs one orchestrator per machine; each keeps its own ledger, queue and costs and
sends the router a snapshot of them when they change (``MachineView``). ``rank()`` orders
the machines that can serve a request, best first; ``route()`` is its first. No IO, no
clock: the runtime (``orchestrator.cluster``) builds the views and carries the answer out.

The rules, in the order they apply:

1. A machine that is down (its orchestrator died and is not back yet) is never chosen, nor
   one whose config does not know the model, nor one whose whole budget is too small for it.
2. Where this same holder already holds a lease on the model: there (the machine grants it
   at once, as one machine does for a holder that holds the model).
3. Where the model is resident (on the GPU, being loaded, or already waited for there: a
   request routed a moment ago counts before the machine's next snapshot shows it), with a
   free slot within its ``max_concurrent``: there, the least loaded first.
4. Otherwise the cheapest move: a machine that holds a host copy of the model (a restore),
   else the machine where placement finds the cheapest room: ``states.placement`` on that
   machine's cards, as they will be once the loads it has been asked for are done, chooses
   the card(s) and scores them (models in use evicted, then the switch's cost: the
   evictions' unloads and the load or restore, then the bytes evicted); the machine with
   the best score wins, ties to the least loaded. A move never evicts a model that holds
   leases or is waited for.
   A resident machine that is full (its ``max_concurrent`` taken, others queued), and a
   move that must wait for busy models to drain, compete with that move by what they are
   expected to cost: a queue, the leases ahead of this one over the capacity times the
   model's hold time (``hold_s``: how long a lease on it is held, as the router has seen);
   a drain, the switch's cost plus the longest hold time of the busy models it evicts, plus
   the load of each of those that is resident on no other machine (its users' next requests
   pay for it). An unknown hold time makes that wait infinite: the move wins.
5. Then the rest in the order: full resident machines, moves that wait for a drain (the
   cheapest, then the fewest busy evictions), a machine where foreign processes hold the
   room (``Deferred``), and last a machine where the plan would evict a model that this
   same holder holds a lease on (that machine refuses it: ``LeaseDeadlock``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from states.cards import Cards
from states.errors import InsufficientVRAM, OrchestratorError
from states.ledger import Ledger, Tier
from states.placement import PlaceContext, place, score
from states.plan import Deferred, Plan, PlanRequest, Policy, SwitchCosts, plan, plan_cost_s
from states.units import format_gib

EXTERNAL_KIND = "external"  # the kind of a raw-bytes reservation (as the runtime names it)


@dataclass(frozen=True)
class MachineView:
    """What the router knows of one machine: its orchestrator's last snapshot, plus the
    requests the router itself sent there since (in ``waiting`` and ``leases``).

    ``cards`` are the machine's ledgers, one per card. ``requests`` has a plan request for
    every model the machine's config knows (at the bytes its orchestrator plans with: a
    spanning model's share per card); ``names`` maps every name, alias and kind that
    machine's config resolves to the model it means there. ``allowed``, ``spans`` and
    ``portable`` are its models' card restrictions, as ``states.placement`` reads them.
    """

    node: str
    cards: Cards
    requests: Mapping[str, PlanRequest]
    names: Mapping[str, str]
    policy: Policy = field(default_factory=Policy)
    leases: Mapping[str, int] = field(default_factory=dict)  # held per model
    waiting: Mapping[str, int] = field(default_factory=dict)  # waiters per model
    capacity: Mapping[str, int] = field(default_factory=dict)  # max_concurrent, where limited
    costs: Mapping[str, SwitchCosts] = field(default_factory=dict)  # learned switch costs
    allowed: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # models.<m>.gpus
    spans: Mapping[str, int] = field(default_factory=dict)  # models.<m>.tensor_parallel > 1
    portable: frozenset[str] = frozenset()  # host copies that may restore onto another card
    alive: bool = True

    @property
    def load(self) -> int:
        """Leases held and waited for: how busy the machine is."""
        return sum(self.leases.values()) + sum(self.waiting.values())


@dataclass(frozen=True)
class RouteRequest:
    """A request to place: a model (a name, an alias or a kind), or ``external_bytes`` of a
    raw reservation (``name`` is then ignored).

    ``held`` is what this request's holder already holds: node -> models it holds leases on
    there. ``hold_s`` is how long a lease on each model is held, on average (a model not in
    it: unknown).
    """

    name: str
    held: Mapping[str, frozenset[str]] = field(default_factory=dict)
    hold_s: Mapping[str, float] = field(default_factory=dict)
    external_bytes: int = 0


class Choice(enum.IntEnum):
    """Why a machine is a candidate; lower is better (rules 2-5)."""

    HELD = 0  # this holder holds a lease on the model there
    RESIDENT = 1  # resident (or coming) with a free slot
    HOST = 2  # a host copy: a restore
    ROOM = 3  # a plan that evicts nothing busy
    QUEUED = 4  # resident, but its capacity is taken: a queue
    AFTER_DRAIN = 5  # a plan that evicts busy models: waits for them to drain
    DEFERRED = 6  # foreign processes hold the room
    DEADLOCK = 7  # the plan evicts a model this holder holds there


REASONS = {
    Choice.HELD: "this holder holds a lease on it there",
    Choice.RESIDENT: "resident",
    Choice.HOST: "restored from its host copy",
    Choice.ROOM: "the cheapest room",
    Choice.QUEUED: "resident, queued for a slot",
    Choice.AFTER_DRAIN: "room once busy models drain",
    Choice.DEFERRED: "room held by other processes",
    Choice.DEADLOCK: "the plan evicts a model this holder holds",
}


@dataclass(frozen=True)
class Route:
    """Serve the request on ``node`` as ``model`` (that machine's name for it)."""

    node: str
    model: str
    choice: Choice
    cost_s: float = 0.0  # the move's switch cost, or a queue's expected wait
    gpus: tuple[int, ...] = ()  # the card(s) placement chose there (a move)
    score: tuple[float, ...] = ()  # placement's score of the move (the worst of its cards)
    evictions: int = 0  # GPU evictions the move needs
    evicted_bytes: int = 0
    busy_evictions: int = 0  # of those, models that hold leases or are waited for
    load: int = 0  # the machine's leases and waiters

    @property
    def reason(self) -> str:
        return REASONS[self.choice]

    def describe(self) -> str:
        cost = f", {self.cost_s:.3g} s" if self.cost_s else ""
        evicts = f", evicting {self.evictions} ({format_gib(self.evicted_bytes)})" if self.evictions else ""
        return f"{self.model} on {self.node} ({self.reason}{cost}{evicts}; load {self.load})"


class NoRoute(OrchestratorError):
    """No machine can serve the request now; the message says why for each."""

    def __init__(self, name: str, why: Mapping[str, str]) -> None:
        self.name, self.why = name, dict(why)
        per_node = "; ".join(f"{node}: {reason}" for node, reason in sorted(self.why.items()))
        super().__init__(
            f"no machine of the cluster can serve {name!r} now "
            f"({per_node or 'the cluster has no machines'}); "
            "start an orchestrator on a machine that has it, or wait for a down machine to come back"
        )


def rank(request: RouteRequest, machines: Sequence[MachineView]) -> tuple[Route, ...]:
    """Every machine that can serve ``request``, best first (see the module docstring).

    :raises NoRoute: no machine can (each is down, does not know the model, or is too small).
    """
    routes: list[Route] = []
    why: dict[str, str] = {}
    elsewhere = _resident_on(machines)
    for m in machines:
        r = _route_on(request, m, why, elsewhere=elsewhere)
        if r is not None:
            routes.append(r)
    if not routes:
        raise NoRoute(_shown(request), why)
    return tuple(_order(routes))


def route(request: RouteRequest, machines: Sequence[MachineView]) -> Route:
    """The best machine for ``request``: ``rank(request, machines)[0]``, without planning on
    every machine when one already holds the model with a free slot (the common case)."""
    quick = [r for m in machines if (r := _route_on(request, m, {}, resident_only=True)) is not None]
    if quick:
        return _order(quick)[0]
    return rank(request, machines)[0]


def _shown(request: RouteRequest) -> str:
    if request.external_bytes:
        return f"a reservation of {format_gib(request.external_bytes)}"
    return request.name


def _order(routes: list[Route]) -> list[Route]:
    """Rules 2-5: the fixed classes, except that a full resident machine competes with the
    cheapest move by its queue's expected wait."""

    def by_load(r: Route) -> tuple[int, str]:
        return (r.load, r.node)

    def by_cost(r: Route) -> tuple[tuple[float, ...], float, int, int, int, str]:
        return (r.score, r.cost_s, r.evictions, r.evicted_bytes, r.load, r.node)

    def of(choice: Choice) -> list[Route]:
        return [r for r in routes if r.choice is choice]

    out = sorted(of(Choice.HELD), key=by_load) + sorted(of(Choice.RESIDENT), key=by_load)
    moves = sorted(of(Choice.HOST), key=by_cost) + sorted(of(Choice.ROOM), key=by_cost)
    queued = sorted(of(Choice.QUEUED), key=by_cost)
    drains = sorted(of(Choice.AFTER_DRAIN), key=lambda r: (r.cost_s, r.busy_evictions, *by_cost(r)))
    firsts = [group[0] for group in (moves, queued, drains) if group]
    if firsts:
        best = min(firsts, key=lambda r: (r.cost_s, r.choice))  # a tie: the move, then the queue
        out.append(best)
    out += [r for r in moves + queued + drains if not (firsts and r is best)]
    out += sorted(of(Choice.DEFERRED), key=by_load) + sorted(of(Choice.DEADLOCK), key=by_cost)
    return out


def _resident_on(machines: Sequence[MachineView]) -> dict[str, set[str]]:
    """model -> the live machines where it is resident (or loading)."""
    out: dict[str, set[str]] = {}
    for m in machines:
        if m.alive:
            for r in m.cards.gpu_residents:
                out.setdefault(r.model, set()).add(m.node)
            for g in m.cards.indexes:
                loading = m.cards.ledger(g).loading
                if loading is not None:
                    out.setdefault(loading.model, set()).add(m.node)
    return out


def _route_on(
    request: RouteRequest,
    m: MachineView,
    why: dict[str, str],
    *,
    resident_only: bool = False,
    elsewhere: Mapping[str, set[str]] | None = None,
) -> Route | None:
    """``request`` on machine ``m``, or ``None`` (with the reason in ``why``); with
    ``resident_only``, only a machine that holds the model with a free slot (else ``None``)."""
    if not m.alive:
        why[m.node] = "down"
        return None
    if request.external_bytes:
        target = PlanRequest(
            model=f"{EXTERNAL_KIND} reservation",
            kind=EXTERNAL_KIND,
            vram_bytes=request.external_bytes,
            external=True,
        )
        model = ""
    else:
        name = m.names.get(request.name)
        req = m.requests.get(name) if name is not None else None
        if name is None or req is None:
            why[m.node] = "its config has no such model or kind"
            return None
        target, model = req, name
    held = request.held.get(m.node, frozenset())
    load = m.load
    if model:
        if model in held:
            return Route(m.node, model, Choice.HELD, load=load)
        if m.cards.gpus_of(model) or m.waiting.get(model, 0) > 0:
            queue_s = _queue_s(m, model, request.hold_s.get(model))
            if queue_s == 0.0:
                return Route(m.node, model, Choice.RESIDENT, load=load)
            if resident_only:
                return None
            return Route(m.node, model, Choice.QUEUED, cost_s=queue_s, load=load)
    if resident_only:
        return None
    pctx = _place_context(m)
    expected = _expected_cards(m, pctx)
    try:
        gpus, host = _placed(target, expected, pctx)
    except InsufficientVRAM as exc:
        why[m.node] = f"needs {format_gib(exc.required_bytes)}, " + (
            exc.reason or f"more than the budget of its largest card ({format_gib(exc.budget_bytes)})"
        )
        return None
    if model and expected.gpus_of(model):  # it comes with a load already asked for
        return Route(m.node, model, Choice.RESIDENT, gpus=gpus, load=load)
    scores = [score(target, expected.view(g), g, pctx) for g in gpus]
    if any(sc is None for sc in scores):
        why[m.node] = f"{target.model} fits none of the cards it may use"
        return None
    worst = max(sc for sc in scores if sc is not None)
    anchor = expected.view(gpus[0])
    p = plan(target, anchor, m.policy)
    if isinstance(p, Deferred):
        return Route(m.node, model, Choice.DEFERRED, gpus=gpus, score=worst, load=load)
    gpu = p.gpu_evictions
    busy = sum(1 for e in gpu if _busy(m, e.model))
    if any(e.model in held for e in gpu):
        choice = Choice.DEADLOCK
    elif busy:
        choice = Choice.AFTER_DRAIN
    elif p.from_tier is Tier.HOST or host:
        choice = Choice.HOST
    else:
        choice = Choice.ROOM
    cost_s = _cost_s(m, p)
    if choice is Choice.AFTER_DRAIN:
        busy_models = [e.model for e in gpu if _busy(m, e.model)]
        # the wait for the busy leases to end, and the reload of each busy model that is
        # resident nowhere else: its users' next requests pay for it
        cost_s += max(request.hold_s.get(b, math.inf) for b in busy_models)
        default = SwitchCosts()
        for b in busy_models:
            if not (elsewhere or {}).get(b, set()) - {m.node}:
                cost_s += m.costs.get(b, default).load_s
    return Route(
        m.node,
        model,
        choice,
        cost_s=cost_s,
        gpus=gpus,
        score=worst,
        evictions=len(gpu),
        evicted_bytes=sum(_bytes_of(anchor, e.model) for e in gpu),
        busy_evictions=busy,
        load=load,
    )


def _placed(target: PlanRequest, cards: Cards, pctx: PlaceContext) -> tuple[tuple[int, ...], bool]:
    """The card(s) placement puts ``target`` on, and whether it restores a host copy. A
    machine of one card has no choice to make (the card, when the model may use it)."""
    if len(cards) == 1 and target.model not in pctx.allowed:
        if target.vram_bytes > cards.ledgers[0].budget_bytes:
            raise InsufficientVRAM(target.model, target.vram_bytes, cards.budget_bytes, cards.budget_bytes)
        return cards.indexes, cards.tier_of(target.model) is Tier.HOST
    placed = place(target, cards, pctx)
    return placed.gpus, placed.why == "host copy"


def _queue_s(m: MachineView, model: str, hold_s: float | None) -> float:
    """The expected wait for a slot on a resident model: 0 with a free one."""
    cap = m.capacity.get(model)
    if cap is None or cap <= 0:
        return 0.0
    ahead = m.leases.get(model, 0) + m.waiting.get(model, 0) + 1 - cap
    if ahead <= 0:
        return 0.0
    if hold_s is None:
        return math.inf
    return ahead / cap * hold_s


def _busy(m: MachineView, model: str) -> bool:
    return m.leases.get(model, 0) > 0 or m.waiting.get(model, 0) > 0


def _bytes_of(ledger: Ledger, model: str) -> int:
    r = ledger.get(model)
    return r.vram_bytes if r is not None else 0


def _cost_s(m: MachineView, p: Plan) -> float:
    return plan_cost_s(p, m.costs)


def _place_context(m: MachineView) -> PlaceContext:
    """What placement reads of ``m``; a model waited for counts as in use (evicting it would
    make its waiters wait for it again)."""
    in_use = dict(m.leases)
    for model, n in m.waiting.items():
        in_use[model] = in_use.get(model, 0) + n
    return PlaceContext(
        policy=m.policy,
        allowed=m.allowed,
        spans=m.spans,
        portable=m.portable,
        leases=in_use,
        costs=m.costs,
    )


def _expected_cards(m: MachineView, pctx: PlaceContext) -> Cards:
    """``m``'s cards once the loads in progress and the loads its waiters ask for are done
    (most waited for first, each where placement puts it, where it fits): what a new
    request must make room beside."""
    cards = m.cards
    for g in cards.indexes:
        if cards.ledger(g).loading is not None:
            cards = cards.finish_load(g)
    wanted = sorted(
        (n, model)
        for model, n in m.waiting.items()
        if n > 0 and model in m.requests and not cards.on_gpu(model)
    )
    for _, model in reversed(wanted):
        req = m.requests[model]
        try:
            placed = place(req, cards, pctx)
        except InsufficientVRAM:
            continue
        if len(placed.gpus) != 1:
            continue  # a spanning model: not simulated (it is placed when its machine decides)
        gpu = placed.anchor
        p = plan(req, cards.view(gpu), m.policy)
        if not isinstance(p, Plan):
            continue
        for e in p.evictions:
            cards = cards.move(e.model, e.to_tier)
        assert p.after.loading is not None
        cards = cards.begin_load(gpu, p.after.loading).finish_load(gpu)
    return cards


def names_of(
    models: Mapping[str, tuple[str, tuple[str, ...]]], defaults: Mapping[str, str]
) -> dict[str, str]:
    """The ``names`` of a ``MachineView``: every model by its name, by each alias, and the
    default of each kind by the kind (as a config resolves them: names first, then kinds,
    then aliases). ``models`` maps a model to (its kind, its aliases)."""
    out: dict[str, str] = {}
    for model, (_, aliases) in models.items():
        for alias in aliases:
            out.setdefault(alias, model)
    for kind, model in defaults.items():
        out[kind] = model
    for model in models:
        out[model] = model
    return out
