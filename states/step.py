"""One scheduler step: a pure function from a frozen snapshot to everything to do next.

``decide(view)`` is the only place that decides. The runtime (``orchestrator/runtime``)
takes a snapshot of the queue, the lease book, the ledger and its own bookkeeping, calls
``decide`` once, applies the grants and failures, sets the drains, runs the ONE action through
its executor, and sleeps until the wake time (or until something changes). Nothing outside
checks a state and then acts on it; this is httpcore's ``_assign_requests_to_connections()``:
the bookkeeping is decided synchronously, and the IO still to do is returned.

The rules, in the order ``decide`` applies them:

1. After a switch (not in fcfs mode), every waiter of the model it loaded is granted first:
   one switch serves the whole batch that was waiting for it. After a failed switch, every
   waiter of its target gets its error (the next acquire retries, after a back-off).
2. Leftovers (memory a backend still holds after a failed cleanup, which the ledger no longer
   counts) are reaped first, each after its retry time: action ``Reap``.
3. A waiter whose own holder holds a lease on the model it waits for is granted at once, even
   while that model drains (the drain waits for this very lease).
4. A waiter whose holder holds a lease on a model that must leave the GPU for it fails with
   ``LeaseDeadlock``: it would wait forever.
5. Over the room (foreign memory grew, or a resident holds more than planned): idle residents
   are evicted in plan's victim order until the ledger fits: action ``Evict``. Requested
   unloads (``unload()``, a reload at a learned size, an ended reservation) of idle residents
   come next: action ``Evict``. Both wait while a failed eviction backs off.
6. Otherwise the scheduling rules (``states.scheduling``) rank the targets; the first whose
   plan is possible is chosen. A model that can never fit fails its waiters
   (``InsufficientVRAM``); one that waits for foreign processes is deferred (its waiters fail
   at once under the ``fail`` foreign-memory policy).
7. ``admission`` grants leases on resident models and says which must drain. A resident
   marked for unloading takes no new lease and drains. A model with a capacity
   (``max_concurrent``) holds at most that many leases at once: the waiters past it keep
   waiting in the queue (higher priority first), where the scheduler sees them, and a drain
   waits only for the leases in progress.
8. If the plan evicts a busy model, the switch waits (until the target's waiters have waited
   long enough: ``scheduling.drain_due_at``, by the measured cost of this switch once the
   busy model's older requests are served, or by ``fairness_s``; or until the leases end).
   One whose last lease has just ended holds it back for its grace
   (``scheduling.grace_ends_at``: a share of the switch's cost), in case its user comes back;
   meanwhile, in fair mode, a model that fits without evicting anything is loaded beside it
   (a side load). Otherwise the switch is the action: ``Switch``.
9. The wake time is the earliest of: a back-off ending, a reap or rebalance retry, the
   fairness bound, a deferred request's next look, a waiter becoming overdue, and (while
   models are resident) the next look at the device for foreign memory.

On a machine with several cards (``view.cards``), placement (``states.placement.place``)
first sends each waited model to the card (or the cards it spans) that serves it; then these
rules run for every card that is not switching, over that card's ledger and the waiters
placed on it, and each card may get one action (``Decision.actions``): switches on different
cards run at the same time. A switch to a model that spans several cards goes ahead when every
one of its cards is idle and its plan there evicts nothing in use (what it would evict drains
meanwhile); it is one joint switch.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field, replace

from states.cards import Cards
from states.errors import InsufficientVRAM, LeaseDeadlock
from states.ledger import Ledger, Resident
from states.placement import PlaceContext, Placement, hide_in_flight, place
from states.plan import Deferred, Plan, PlanRequest, Policy, SwitchCosts, plan, plan_cost_s, victim_order
from states.scheduling import (
    Mode,
    SchedulerView,
    WaiterView,
    admission,
    drain_due_at,
    grace_ends_at,
    rank_targets,
)

DEFERRED_POLL_S = 0.05  # how often a request blocked by foreign memory looks again


@dataclass(frozen=True)
class StepSettings:
    """The policy knobs one step reads (from the config)."""

    mode: Mode = Mode.FAIR
    fairness_by_cost: bool = False  # the cost rule of drain_due_at (else the time rule)
    fairness_s: float = 5.0
    max_wait_s: float = 300.0
    foreign_memory_fails: bool = False  # switching.foreign_memory: fail (else wait)
    look_period_s: float = 1.0  # while models are resident, how often to read the device


@dataclass(frozen=True)
class StepView:
    """A frozen snapshot of everything a step decides from.

    ``requests`` describes every model that is waited for or holds leases (its kind, the
    bytes it is planned at, whether it can keep a host copy). ``holders`` maps a model to the
    holders (tasks, or remote clients) with leases on it and how many each holds.
    """

    now_s: float
    ledger: Ledger
    waiters: tuple[WaiterView, ...]
    requests: Mapping[str, PlanRequest]
    policy: Policy = field(default_factory=Policy)
    settings: StepSettings = field(default_factory=StepSettings)
    leases: Mapping[str, int] = field(default_factory=dict)
    holders: Mapping[str, Mapping[Hashable, int]] = field(default_factory=dict)
    lost_gpu_s: Mapping[str, float] = field(default_factory=dict)
    last_release: Mapping[str, tuple[float, Hashable]] = field(default_factory=dict)  # when, whose
    hold_s: Mapping[str, float] = field(default_factory=dict)  # a lease's learned time, per model
    backoff_until: Mapping[str, float] = field(default_factory=dict)
    to_unload: Mapping[str, str] = field(default_factory=dict)  # model -> why
    leftovers: frozenset[str] = frozenset()  # held by a backend, not in the ledger
    reap_after: Mapping[str, float] = field(default_factory=dict)
    rebalance_after_s: float = 0.0  # a failed eviction backs off until then
    just_loaded: str | None = None  # the model the switch before this step loaded
    just_failed: tuple[str, Exception] | None = None  # the target of a switch that just failed
    foreign_text: str = ""  # "; other processes: ..." for messages (may be empty)
    capacity: Mapping[str, int] = field(default_factory=dict)  # leases at once, per limited model
    costs: Mapping[str, SwitchCosts] = field(default_factory=dict)  # per model; absent: the defaults
    # Several cards (None: ``ledger`` is the one card). Then ``ledger`` is ignored, and:
    cards: Cards | None = None
    busy: frozenset[int] = frozenset()  # cards with an action in progress
    in_flight: frozenset[str] = frozenset()  # models a running action loads or evicts
    loading: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # running switches' targets
    card_used_s: Mapping[int, float] = field(default_factory=dict)  # each card's last grant
    host_pending_bytes: int = 0  # host RAM that running actions will fill with host copies
    allowed: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # models.<m>.gpus
    spans: Mapping[str, int] = field(default_factory=dict)  # models.<m>.tensor_parallel > 1
    portable: frozenset[str] = frozenset()  # host copies that may restore onto another card
    home: Mapping[str, int] = field(default_factory=dict)  # the card a backend last used
    loaded_on: Mapping[int, str] = field(default_factory=dict)  # per card: its just_loaded
    failed_on: Mapping[int, tuple[str, Exception]] = field(default_factory=dict)  # its just_failed
    drained: frozenset[str] = frozenset()  # drained by another card's step (a spanning model)


@dataclass(frozen=True)
class Switch:
    """Carry out ``plan``: its evictions, then its load."""

    plan: Plan
    side_load: bool = False  # beside a busy model that drains for another target
    more: tuple[tuple[int, Plan], ...] = ()  # a spanning model: its plans on its other cards


@dataclass(frozen=True)
class Evict:
    """A switch that loads nothing: unload ``models`` (idle GPU residents) to disk."""

    models: tuple[str, ...]
    reason: str
    requested: bool = False  # these were unload requests (forget them once done)


@dataclass(frozen=True)
class Reap:
    """Unload what backends still hold though the ledger no longer counts it."""

    models: tuple[str, ...]


Action = Switch | Evict | Reap


@dataclass(frozen=True)
class Decision:
    """Everything one step decided. The runtime applies it in this order: failures,
    grants, drains, then the action."""

    grants: tuple[int, ...] = ()  # waiter seqs, in grant order
    failures: tuple[tuple[int, Exception], ...] = ()  # (waiter seq, its error)
    drain: frozenset[str] = frozenset()  # residents that take no new leases
    action: Action | None = None
    wake_at_s: float | None = None  # decide again then at the latest (None: when poked)
    deferred: Mapping[str, Deferred] = field(default_factory=dict)
    settled_unloads: frozenset[str] = frozenset()  # unload requests whose model is gone
    actions: tuple[tuple[int, Action], ...] = ()  # several cards: (card, its action) each


def backoff_s(failures_in_a_row: int, retry_backoff_s: float, max_wait_s: float) -> float:
    """How long a model is held back after its ``failures_in_a_row``-th failure in a row:
    doubling from ``retry_backoff_s``, at most a quarter of ``max_wait_s``."""
    return float(min(retry_backoff_s * 2 ** (failures_in_a_row - 1), max_wait_s / 4))


def grants_at_once(
    ledger: Ledger | Cards,
    model: str,
    *,
    queue_length: int,
    switching: bool,
    draining: frozenset[str],
    to_unload: Mapping[str, str],
    held: int = 0,
    capacity: int | None = None,
) -> bool:
    """What ``decide`` would answer for a lone waiter, without a round trip through the
    scheduler (acquire()'s fast path): grant at once when the model is on the GPU with a free
    slot (``held`` leases of its ``capacity``), nothing drains it, it is not marked for
    unloading, no switch runs and nobody else waits."""
    return (
        queue_length == 1
        and not switching
        and model not in draining
        and model not in to_unload
        and (capacity is None or held < capacity)
        and ledger.on_gpu(model)
    )


class _Step:
    """The working state of one ``decide`` call (a private helper, thrown away after it)."""

    def __init__(self, view: StepView) -> None:
        self.view = view
        self.waiters = list(view.waiters)
        self.grants: list[int] = []
        self.failures: list[tuple[int, Exception]] = []
        self.leases = dict(view.leases)
        self.wake_at: list[float] = []
        self.on_gpu = frozenset(r.model for r in view.ledger.gpu_residents)

    def grant(self, w: WaiterView) -> None:
        self.waiters.remove(w)
        self.grants.append(w.seq)
        self.leases[w.model] = self.leases.get(w.model, 0) + 1

    def grant_within_capacity(self, waiters: list[WaiterView]) -> None:
        """Grant ``waiters`` while their model has a free slot: overdue ones (waited
        ``max_wait_s``) first, then higher priority, then arrival (arrival alone in fcfs
        mode); the rest keep waiting, seen by the scheduler."""
        fcfs = self.view.settings.mode is Mode.FCFS
        capacity = self.view.capacity
        deadline = self.view.now_s - self.view.settings.max_wait_s

        def order(w: WaiterView) -> tuple[bool, int, int]:
            return (w.arrived_s > deadline, 0 if fcfs else -w.priority, w.seq)

        for w in sorted(waiters, key=order):
            cap = capacity.get(w.model)
            if cap is None or self.leases.get(w.model, 0) < cap:
                self.grant(w)

    def fail(self, w: WaiterView, error: Exception) -> None:
        self.waiters.remove(w)
        self.failures.append((w.seq, error))

    def decision(
        self,
        *,
        wake_at_s: float | None,
        settled_unloads: frozenset[str],
        action: Action | None = None,
        drain: frozenset[str] = frozenset(),
        deferred: Mapping[str, Deferred] | None = None,
    ) -> Decision:
        return Decision(
            grants=tuple(self.grants),
            failures=tuple(self.failures),
            drain=drain,
            action=action,
            wake_at_s=wake_at_s,
            deferred=deferred or {},
            settled_unloads=settled_unloads,
        )


def decide(view: StepView) -> Decision:
    """Decide one scheduler step (see the module docstring for the rules)."""
    if view.cards is not None and len(view.cards) > 1:
        return _decide_cards(view, view.cards)
    return _decide_card(view)


def _decide_card(view: StepView) -> Decision:
    s = _Step(view)
    now = view.now_s
    ledger = view.ledger
    settled = frozenset(m for m in view.to_unload if ledger.get(m) is None)

    # 1. The batch the last switch was for: served by it, or given its error.
    if view.just_loaded is not None and view.settings.mode is not Mode.FCFS and view.just_loaded in s.on_gpu:
        s.grant_within_capacity([w for w in s.waiters if w.model == view.just_loaded])
    if view.just_failed is not None:
        failed, error = view.just_failed
        for w in [w for w in s.waiters if w.model == failed]:
            s.fail(w, error)

    # 2. Leftovers of failed cleanups.
    reap = tuple(sorted(m for m in view.leftovers if view.reap_after.get(m, 0.0) <= now))
    if reap:
        return s.decision(action=Reap(reap), wake_at_s=now, settled_unloads=settled)
    s.wake_at += [t for m, t in view.reap_after.items() if m in view.leftovers and t > now]

    # 3. Re-entrant acquires (past the model's capacity too: the holder's own slot is taken,
    #    and refusing it a second one would have it wait for itself).
    for w in [w for w in s.waiters if w.model in s.on_gpu and view.holders.get(w.model, {}).get(w.holder)]:
        s.grant(w)

    # 4. Deadlocks.
    for w in list(s.waiters):
        held = _deadlocked_on(view, w)
        if held is not None:
            s.fail(w, LeaseDeadlock(w.model, held))

    # 5. Rebalance, then requested unloads.
    if view.rebalance_after_s > now:
        s.wake_at.append(view.rebalance_after_s)
    else:
        evict = _rebalance(view, s.leases) or _requested_unloads(view, s.leases, settled)
        if evict is not None:
            return s.decision(action=evict, wake_at_s=now, settled_unloads=settled)

    # 6. The target: the best-ranked model whose plan is possible now.
    blocked = {m for m, until in view.backoff_until.items() if until > now}
    s.wake_at += [t for t in view.backoff_until.values() if t > now]
    deferred: dict[str, Deferred] = {}
    target: str | None = None
    chosen: Plan | None = None
    while True:
        ranked = rank_targets(_scheduler_view(view, s.waiters, s.on_gpu, s.leases, blocked))
        if not ranked:
            break
        target = ranked[0]
        try:
            p = plan(view.requests[target], ledger, view.policy)
        except InsufficientVRAM as exc:
            for w in [w for w in s.waiters if w.model == target]:
                s.fail(w, exc)
            target = None
            continue
        if isinstance(p, Deferred):
            deferred[target] = p
            if view.settings.foreign_memory_fails:
                err = InsufficientVRAM(
                    target,
                    p.needed_bytes,
                    p.available_bytes,
                    ledger.budget_bytes,
                    reason=p.reason + view.foreign_text,
                    advice="wait for those processes to end, or set switching.foreign_memory: wait",
                )
                for w in [w for w in s.waiters if w.model == target]:
                    s.fail(w, err)
            else:
                blocked.add(target)
                s.wake_at.append(now + DEFERRED_POLL_S)
            target = None
            continue
        chosen = p
        break

    # 7. Grants on resident models, and drains.
    sv = _scheduler_view(view, s.waiters, s.on_gpu, s.leases, frozenset(blocked))
    evictees = frozenset(e.model for e in chosen.gpu_evictions) if chosen is not None else frozenset()
    cost_s = switch_cost_s(view, chosen) if chosen is not None and view.settings.fairness_by_cost else None
    adm = admission(sv, target, evictees, cost_s)
    drain = frozenset(adm.drain | set(view.to_unload) | view.drained)
    held_back = set(view.to_unload) | view.drained
    s.grant_within_capacity([w for w in s.waiters if w.seq in adm.grant and w.model not in held_back])

    if chosen is None or target is None:
        return s.decision(
            wake_at_s=_wake_at(view, s), drain=drain, deferred=deferred, settled_unloads=settled
        )

    # 8. A busy evictee, or one just released (its grace), holds the switch back; a side
    #    load may go meanwhile.
    side = False
    grace = grace_ends_at(sv, evictees, cost_s) if cost_s is not None and not adm.drain else None
    if any(s.leases.get(m, 0) for m in evictees) or grace is not None:
        # Wake when the waiters have waited long enough, or when the grace ends; an
        # infinite time is "once the evictees' older waiters are granted", and the release
        # before it wakes the step.
        due = drain_due_at(sv, target, evictees, cost_s)
        if not adm.drain and math.isfinite(due):
            s.wake_at.append(due)
        if grace is not None:
            s.wake_at.append(grace)
        beside = _side_load(view, sv, target) if view.settings.mode is Mode.FAIR else None
        if beside is None:
            return s.decision(
                wake_at_s=_wake_at(view, s), drain=drain, deferred=deferred, settled_unloads=settled
            )
        chosen, side = beside, True
    return s.decision(
        action=Switch(chosen, side_load=side),
        wake_at_s=now,
        drain=drain,
        deferred=deferred,
        settled_unloads=settled,
    )


def switch_cost_s(view: StepView, p: Plan) -> float:
    """What carrying out ``p`` costs, by the view's costs (``states.plan.plan_cost_s``)."""
    return plan_cost_s(p, view.costs)


def _scheduler_view(
    view: StepView,
    waiters: list[WaiterView],
    on_gpu: frozenset[str],
    leases: Mapping[str, int],
    blocked: set[str] | frozenset[str],
) -> SchedulerView:
    st = view.settings
    return SchedulerView(
        now_s=view.now_s,
        waiters=tuple(waiters),
        on_gpu=on_gpu,
        leases=leases,
        lost_gpu_s=view.lost_gpu_s,
        last_release=view.last_release,
        capacity=view.capacity,
        hold_s=_hold_s(view),
        blocked=frozenset(blocked),
        mode=st.mode,
        fairness_s=st.fairness_s,
        max_wait_s=st.max_wait_s,
    )


def _hold_s(view: StepView) -> dict[str, float]:
    """How long a lease is held, per model that serves few at once: learned from the leases
    that ended; before one has, the model's load time (``SchedulerView.hold_s``)."""
    default = SwitchCosts()
    prior = {m: view.costs.get(m, default).load_s for m in view.capacity}
    return {**prior, **view.hold_s}


def _kind_bytes(view: StepView, model: str) -> tuple[str, int]:
    """A model's kind and its configured bytes (a reservation that ended: nothing)."""
    r = view.requests.get(model)
    if r is None:
        return "", 0
    return r.kind, (r.configured_bytes or r.vram_bytes)


def _deadlocked_on(view: StepView, w: WaiterView) -> str | None:
    """The model on which ``w``'s own holder holds a lease and that must leave for ``w``."""
    if view.ledger.on_gpu(w.model):
        return None  # nothing has to leave for a model that is already resident
    kind, n_bytes = _kind_bytes(view, w.model)
    for held, by_holder in view.holders.items():
        if held == w.model or not by_holder.get(w.holder):
            continue
        other_kind, other_bytes = _kind_bytes(view, held)
        both_heavy = view.policy.is_exclusive(kind) and view.policy.is_exclusive(other_kind)
        if both_heavy or n_bytes + other_bytes > view.ledger.budget_bytes:
            return held
    return None


def _rebalance(view: StepView, leases: Mapping[str, int]) -> Evict | None:
    """Over the room: evict idle residents, in plan's victim order, until the ledger fits."""
    ledger = view.ledger
    if ledger.fits():
        return None
    idle: list[Resident] = [r for r in ledger.gpu_residents if not leases.get(r.model) and not r.external]
    over = ledger.committed_bytes - ledger.available_bytes
    chosen = _enough(victim_order(idle), over)
    if not chosen:
        return None  # every resident is in use: their releases wake the scheduler
    return Evict(tuple(r.model for r in chosen), "over the room")


def _enough(order: list[Resident], over_bytes: int) -> list[Resident]:
    """The first residents of ``order`` that free ``over_bytes`` (all of them if not enough)."""
    chosen: list[Resident] = []
    freed = 0
    for r in order:
        if freed >= over_bytes:
            break
        chosen.append(r)
        freed += r.vram_bytes
    return chosen


def _requested_unloads(view: StepView, leases: Mapping[str, int], settled: frozenset[str]) -> Evict | None:
    idle = sorted(m for m in view.to_unload if m not in settled and not leases.get(m))
    if not idle:
        return None
    reasons = sorted({view.to_unload[m] for m in idle})
    return Evict(tuple(idle), "; ".join(reasons), requested=True)


def _side_load(view: StepView, sv: SchedulerView, target: str) -> Plan | None:
    """A model further down the ranking that fits without evicting anything."""
    for model in rank_targets(sv):
        if model == target:
            continue
        try:
            p = plan(view.requests[model], view.ledger, view.policy)
        except InsufficientVRAM:
            continue
        if isinstance(p, Plan) and not p.gpu_evictions:
            return p
    return None


def _wake_at(view: StepView, s: _Step) -> float | None:
    times = list(s.wake_at)
    times += [w.arrived_s + view.settings.max_wait_s for w in s.waiters]
    if view.ledger.gpu_residents:
        # Foreign memory can grow while nothing happens here: look at the device now and then.
        times.append(view.now_s + view.settings.look_period_s)
    later = [t for t in times if t > view.now_s]
    return min(later) if later else None


# -- several cards ---------------------------------------------------------------------------


def _decide_cards(view: StepView, cards: Cards) -> Decision:
    """Place every waited model, decide each idle card over its own waiters, and join a
    spanning model's switch across its cards (see the module docstring)."""
    pctx = PlaceContext(
        policy=view.policy,
        allowed=view.allowed,
        spans=view.spans,
        portable=view.portable,
        busy=view.busy,
        leases=view.leases,
        costs=view.costs,
        # A model a failed cleanup left on a card stays there until reaped: it is placed there.
        loading={**{m: (view.home.get(m, cards.indexes[0]),) for m in view.leftovers}, **view.loading},
        used_s=view.card_used_s,
    )
    views = {g: hide_in_flight(cards.view(g), view.in_flight, view.host_pending_bytes) for g in cards.indexes}
    settled = frozenset(m for m in view.to_unload if cards.get(m) is None)

    failures: list[tuple[int, Exception]] = []
    placed: dict[str, tuple[int, ...] | InsufficientVRAM] = {}
    by_card: dict[int, list[WaiterView]] = {g: [] for g in cards.indexes}
    # Models are placed in the order they are waited for, except that those that need no
    # eviction (resident, or fitting in free room on their best card as if no other model
    # were placed in this step) go first: a card given a model to switch in counts as busy
    # for the models placed after it, and a light model that fits beside a resident one
    # must not be sent to evict elsewhere because a model waited for earlier claimed the
    # card it fits on.
    first: dict[str, Placement | InsufficientVRAM] = {}
    for w in view.waiters:
        if w.model not in first:
            try:
                first[w.model] = place(view.requests[w.model], cards, pctx, views)
            except InsufficientVRAM as exc:
                first[w.model] = exc
    claimed: set[int] = set()  # cards given a model to switch in, in this step
    for m in sorted(first, key=lambda m: _evicts(first[m])):
        p0 = first[m]
        if isinstance(p0, InsufficientVRAM):
            placed[m] = p0
            continue
        try:
            p = p0  # claims only make the claimed cards worse: placed again if it chose one
            if claimed & set(p0.gpus):
                p = place(view.requests[m], cards, replace(pctx, busy=view.busy | claimed), views)
            placed[m] = p.gpus
            if p.why != "resident":
                claimed.update(p.gpus)
        except InsufficientVRAM as exc:
            placed[m] = exc
    for w in view.waiters:
        where = placed[w.model]
        if isinstance(where, InsufficientVRAM):
            failures.append((w.seq, where))
        else:
            by_card[where[0]].append(w)

    # A spanning model is decided for on its first card. For every card of it, it is in use
    # while another of its cards switches (that switch may be evicting it); for its other
    # cards, also while it has waiters (its first card grants them in this step). What they
    # drain of it, its first card grants no more of. Cards are decided from the last to the
    # first, so that those drains are known when its first card's turn comes.
    in_use_elsewhere: dict[str, int] = {}  # for its other cards than the first
    in_use_everywhere: dict[str, int] = {}  # for every card of it
    for m, k in view.spans.items():
        on = cards.gpus_of(m)
        if k > 1 and on:
            waiting = sum(1 for w in view.waiters if w.model == m)
            if waiting:
                in_use_elsewhere[m] = waiting
            if set(on) & view.busy:
                in_use_everywhere[m] = 1

    grants: list[int] = []
    drain: set[str] = set()
    actions: list[tuple[int, Action]] = []
    wakes: list[float] = []
    deferred: dict[str, Deferred] = {}
    for gpu in sorted(cards.indexes, reverse=True):
        if gpu in view.busy:
            continue
        own = cards.ledger(gpu)
        leases = dict(view.leases)
        for m, n in in_use_elsewhere.items():
            if gpu != cards.gpus_of(m)[0] and gpu in cards.gpus_of(m):
                leases[m] = leases.get(m, 0) + n
        for m, n in in_use_everywhere.items():
            if gpu in cards.gpus_of(m):
                leases[m] = leases.get(m, 0) + n
        outside = frozenset(m for m in drain if m in view.spans) | view.in_flight
        sub = replace(
            view,
            cards=None,
            ledger=views[gpu],
            waiters=tuple(by_card[gpu]),
            leases=leases,
            holders={m: h for m, h in view.holders.items() if gpu in cards.gpus_of(m)},
            leftovers=frozenset(m for m in view.leftovers if view.home.get(m, cards.indexes[0]) == gpu),
            to_unload={
                m: why
                for m, why in view.to_unload.items()
                if own.get(m) is not None and (cards.gpus_of(m) or (gpu,))[0] == gpu  # a span: its first card
            },
            just_loaded=view.loaded_on.get(gpu),
            just_failed=view.failed_on.get(gpu),
            drained=outside,
        )
        d = _decide_card(sub)
        grants += d.grants
        failures += d.failures
        drain |= d.drain
        deferred.update(d.deferred)
        if d.wake_at_s is not None:
            wakes.append(d.wake_at_s)
        if d.action is not None:
            actions.append((gpu, d.action))

    spans = {m: where for m, where in placed.items() if not isinstance(where, InsufficientVRAM)}
    actions, waiting = _join_spans(view, views, actions, spans, drain)
    actions = _apart(actions)
    if waiting:
        wakes.append(view.now_s + DEFERRED_POLL_S)
    return Decision(
        grants=tuple(grants),
        failures=tuple(failures),
        drain=frozenset(drain),
        action=None,
        wake_at_s=view.now_s if actions else (min(wakes) if wakes else None),
        deferred=deferred,
        settled_unloads=settled,
        actions=tuple(actions),
    )


def _evicts(p: Placement | InsufficientVRAM) -> bool:
    """Whether placing ``p`` needs an eviction or a wait (rule 3's score says so)."""
    if isinstance(p, InsufficientVRAM) or p.why == "resident":
        return False
    return not p.score or p.score[:3] != (0, 0, 0) or p.score[4] != 0


def _join_spans(
    view: StepView,
    views: Mapping[int, Ledger],
    actions: list[tuple[int, Action]],
    spans: Mapping[str, tuple[int, ...]],
    drain: set[str],
) -> tuple[list[tuple[int, Action]], bool]:
    """A switch to a spanning model, decided on its first card, becomes one joint switch
    over all its cards when each is idle and its plan there evicts nothing in use; until
    then it waits, and what it would evict there drains. Its other cards start nothing else
    in this step (their room is the span's). Returns the actions, and whether a span waits
    for a card to become idle or for room (a look again soon)."""
    out: list[tuple[int, Action]] = []
    taken: set[int] = set()
    waiting = False
    for gpu, action in actions:
        if not isinstance(action, Switch) or view.spans.get(action.plan.load, 1) <= 1:
            out.append((gpu, action))
            continue
        model = action.plan.load
        more: list[tuple[int, Plan]] = []
        ready = True
        for other in spans.get(model, ()):
            if other == gpu:
                continue
            taken.add(other)
            p: Plan | Deferred | None = None
            if other not in view.busy:
                try:
                    p = plan(view.requests[model], views[other], view.policy)
                except (InsufficientVRAM, ValueError):
                    p = None
            if not isinstance(p, Plan):
                ready = False
                continue
            in_use = {e.model for e in p.gpu_evictions if view.leases.get(e.model, 0)}
            if in_use:
                drain |= in_use
                ready = False
            more.append((other, p))
        if ready:
            out.append((gpu, replace(action, more=tuple(more))))
        else:
            waiting = True
    kept = [(g, a) for g, a in out if g not in taken or (isinstance(a, Switch) and a.more)]
    return kept, waiting


def _models_of(action: Action) -> set[str]:
    if isinstance(action, Switch):
        plans = (action.plan, *(p for _, p in action.more))
        return {p.load for p in plans} | {e.model for p in plans for e in p.evictions}
    return set(action.models)


def _apart(actions: list[tuple[int, Action]]) -> list[tuple[int, Action]]:
    """Actions of one step that touch no model in common: a model spanning two cards could
    otherwise be evicted by both at once (both over their room, say). The later one waits for
    the next step, which sees what the first did."""
    out: list[tuple[int, Action]] = []
    touched: set[str] = set()
    for gpu, action in actions:
        models = _models_of(action)
        if models & touched:
            continue
        touched |= models
        out.append((gpu, action))
    return out
