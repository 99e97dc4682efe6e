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
   else the machine where placement finds the cheapest room (``states.plan.plan`` on that
   machine's ledger, as it will be once the loads it has been asked for are done; a plan
   costs its evictions' unloads and its load, ``states.step.switch_cost_s``, then the
   number and bytes of its evictions), ties to the least loaded. A move never evicts a
   model that holds leases or is waited for.
   A resident machine that is full (its ``max_concurrent`` taken, others queued) competes
   with that move: its queue's expected wait (the leases ahead of this one, over the
   capacity, times ``hold_s``, how long a lease on the model is held) against the move's
   cost; with ``hold_s`` unknown, the move wins.
5. Then a full resident machine; then a move that must wait for busy models to drain (the
   fewest busy evictions, then the cheapest); then a machine where foreign processes hold
   the room (``Deferred``); last a machine where the plan would evict a model that this
   same holder holds a lease on (that machine refuses it: ``LeaseDeadlock``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from states.errors import InsufficientVRAM, OrchestratorError
from states.ledger import Ledger, Tier
from states.plan import Deferred, Plan, PlanRequest, Policy, plan
from states.step import StepView, SwitchCosts, switch_cost_s
from states.units import format_gib

EXTERNAL_KIND = "external"  # the kind of a raw-bytes reservation (as the runtime names it)


@dataclass(frozen=True)
class MachineView:
    """What the router knows of one machine: its orchestrator's last snapshot, plus the
    requests the router itself sent there since (in ``waiting`` and ``leases``).

    ``requests`` has a plan request for every model the machine's config knows (at the
    bytes its orchestrator plans with); ``names`` maps every name, alias and kind that
    machine's config resolves to the model it means there.
    """

    node: str
    ledger: Ledger
    requests: Mapping[str, PlanRequest]
    names: Mapping[str, str]
    policy: Policy = field(default_factory=Policy)
    leases: Mapping[str, int] = field(default_factory=dict)  # held per model
    waiting: Mapping[str, int] = field(default_factory=dict)  # waiters per model
    capacity: Mapping[str, int] = field(default_factory=dict)  # max_concurrent, where limited
    costs: Mapping[str, SwitchCosts] = field(default_factory=dict)  # learned switch costs
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
    there. ``hold_s`` is how long a lease on the model is held, on average (``None``:
    unknown).
    """

    name: str
    held: Mapping[str, frozenset[str]] = field(default_factory=dict)
    hold_s: float | None = None
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
    for m in machines:
        r = _route_on(request, m, why)
        if r is not None:
            routes.append(r)
    if not routes:
        raise NoRoute(_shown(request), why)
    return tuple(_order(routes))


def route(request: RouteRequest, machines: Sequence[MachineView]) -> Route:
    """The best machine for ``request``: ``rank(request, machines)[0]``."""
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

    def by_cost(r: Route) -> tuple[float, int, int, int, str]:
        return (r.cost_s, r.evictions, r.evicted_bytes, r.load, r.node)

    def of(choice: Choice) -> list[Route]:
        return [r for r in routes if r.choice is choice]

    out = sorted(of(Choice.HELD), key=by_load) + sorted(of(Choice.RESIDENT), key=by_load)
    moves = sorted(of(Choice.HOST), key=by_cost) + sorted(of(Choice.ROOM), key=by_cost)
    queued = sorted(of(Choice.QUEUED), key=by_cost)
    if moves and queued and queued[0].cost_s <= moves[0].cost_s:
        out += queued + moves
    else:
        out += moves + queued
    out += sorted(of(Choice.AFTER_DRAIN), key=lambda r: (r.busy_evictions, *by_cost(r)))
    out += sorted(of(Choice.DEFERRED), key=by_load) + sorted(of(Choice.DEADLOCK), key=by_cost)
    return out


def _route_on(request: RouteRequest, m: MachineView, why: dict[str, str]) -> Route | None:
    """``request`` on machine ``m``, or ``None`` (with the reason in ``why``)."""
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
    if target.vram_bytes > m.ledger.budget_bytes:
        why[m.node] = (
            f"needs {format_gib(target.vram_bytes)}, "
            f"more than its budget of {format_gib(m.ledger.budget_bytes)}"
        )
        return None
    held = request.held.get(m.node, frozenset())
    load = m.load
    if model:
        if model in held:
            return Route(m.node, model, Choice.HELD, load=load)
        ledger = m.ledger
        coming = ledger.loading is not None and ledger.loading.model == model
        if ledger.on_gpu(model) or coming or m.waiting.get(model, 0) > 0:
            queue_s = _queue_s(m, model, request.hold_s)
            if queue_s == 0.0:
                return Route(m.node, model, Choice.RESIDENT, load=load)
            return Route(m.node, model, Choice.QUEUED, cost_s=queue_s, load=load)
    expected = _expected_ledger(m)
    if model and expected.on_gpu(model):  # it comes with a load already asked for
        return Route(m.node, model, Choice.RESIDENT, load=load)
    try:
        p = plan(target, expected, m.policy)
    except InsufficientVRAM as exc:  # (the budget was checked above: kept for safety)
        why[m.node] = str(exc)
        return None
    if isinstance(p, Deferred):
        return Route(m.node, model, Choice.DEFERRED, load=load)
    gpu = p.gpu_evictions
    busy = sum(1 for e in gpu if _busy(m, e.model))
    evicted_bytes = sum(_bytes_of(expected, e.model) for e in gpu)
    cost_s = _cost_s(m, p)
    if any(e.model in held for e in gpu):
        choice = Choice.DEADLOCK
    elif busy:
        choice = Choice.AFTER_DRAIN
    elif p.from_tier is Tier.HOST:
        choice = Choice.HOST
    else:
        choice = Choice.ROOM
    return Route(
        m.node,
        model,
        choice,
        cost_s=cost_s,
        evictions=len(gpu),
        evicted_bytes=evicted_bytes,
        busy_evictions=busy,
        load=load,
    )


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
    view = StepView(now_s=0.0, ledger=m.ledger, waiters=(), requests={}, policy=m.policy, costs=m.costs)
    return switch_cost_s(view, p)


def _expected_ledger(m: MachineView) -> Ledger:
    """``m``'s ledger once the load in progress and the loads its waiters ask for are done
    (most waited for first, where each fits): what a new request must make room beside."""
    ledger = m.ledger
    if ledger.loading is not None:
        ledger = ledger.finish_load()
    wanted = sorted(
        (n, model)
        for model, n in m.waiting.items()
        if n > 0 and model in m.requests and not ledger.on_gpu(model)
    )
    for _, model in reversed(wanted):
        req = m.requests[model]
        if req.vram_bytes > ledger.budget_bytes:
            continue
        p = plan(req, ledger, m.policy)
        if isinstance(p, Plan):
            ledger = p.after.finish_load()
    return ledger


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
