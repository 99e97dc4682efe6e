"""Whom to serve next: pure scheduling decisions over a snapshot of the queue.

The orchestrator builds a ``SchedulerView`` (its clock reading is an input, so this module
stays free of IO) and asks two questions:

- ``choose_target(view)``: which model that is not on the GPU should be switched in next;
- ``admission(view, target, evictees)``: which waiters may be granted leases on models that
  are already resident, and which resident models must stop taking new leases ("drain") so
  that the switch to ``target`` can begin.

Three modes, so that the benchmark can compare them on the same orchestrator:

``fair`` (the default)
    Waiters for resident models are served at once, so a busy model is not evicted for every
    passing request (switches are expensive). A model that must be evicted keeps taking new
    leases until the target's waiters have waited long enough (``drain_due_at``: by the cost
    rule, their accumulated wait against the price of the switch, once its own requests that
    came before them are served; by the time rule, the oldest's wait against
    ``fairness_s``); then it drains. A waiter's
    age counts from when its model last lost the GPU, not from its arrival: two models with
    old waiters would otherwise take the GPU from each other forever.
    Targets are ordered by: overdue (waited ``max_wait_s`` since arrival) first, then priority
    (higher first), then age. A target with a higher priority than every waiter of the models
    it evicts drains them at once. The floor and the price give way to a hard bound: the
    drain begins in time for half the switch to be done when the oldest has waited
    ``max_wait_s``.
    A model that must be evicted but has just become idle stays a moment (``grace_ends_at``:
    an eighth of the switch's cost after its last lease ended) when that lease's user has come
    back to it before and waits for nothing: a user between two requests (an artist between
    two images) comes back within it.
    While the first target waits for leases to drain, a model
    further down the ranking that fits without evicting anything is loaded meanwhile (the
    orchestrator does this: it needs the plans).
``fcfs``
    Strict arrival order, as the Model Management Module's ``with manager.use_x()`` calls behave: a
    waiter is granted only when no earlier waiter wants a model that is not resident, and
    after a switch only the waiters up to the next one for another model are served.
``resident_first``
    Always serve the resident models; switch only when their leases end on their own.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

FLOOR_SHARE = 0.6  # the cost rule drains no sooner than this share of max_wait_s
PRICE_FACTOR = 16.0  # waiter-seconds per second of switch, per user the switch holds up
GRACE_SHARE = 0.125  # an idle model just released stays this share of the switch's cost
BOUND_SHARE = 0.5  # the hard bound drains so that this share of the switch is done by max_wait_s


class Mode(enum.Enum):
    FAIR = "fair"
    FCFS = "fcfs"
    RESIDENT_FIRST = "resident_first"


@dataclass(frozen=True)
class WaiterView:
    seq: int  # arrival order, unique
    model: str
    priority: int
    arrived_s: float
    holder: Hashable = None  # who waits (a task, a remote client): re-entrance and deadlocks


@dataclass(frozen=True)
class SchedulerView:
    now_s: float
    waiters: tuple[WaiterView, ...]
    on_gpu: frozenset[str]
    leases: Mapping[str, int] = field(default_factory=dict)
    lost_gpu_s: Mapping[str, float] = field(default_factory=dict)
    last_release: Mapping[str, tuple[float, Hashable]] = field(default_factory=dict)  # when, whose
    capacity: Mapping[str, int] = field(default_factory=dict)  # leases at once, per limited model
    hold_s: Mapping[str, float] = field(default_factory=dict)  # a lease's time, per limited model
    blocked: frozenset[str] = frozenset()  # not to be switched to now (back-off after a failure)
    mode: Mode = Mode.FAIR
    fairness_s: float = 5.0
    max_wait_s: float = 300.0

    def since_s(self, w: WaiterView) -> float:
        """When ``w`` started waiting, for fairness: its arrival or when its model lost the GPU."""
        return max(w.arrived_s, self.lost_gpu_s.get(w.model, w.arrived_s))

    def overdue(self, w: WaiterView) -> bool:
        return self.now_s - w.arrived_s >= self.max_wait_s

    def queued_s(self, model: str, n: int) -> list[float]:
        """For ``n`` waiters of ``model`` in their order, how long after the model comes in each
        one's lease begins: the model serves ``capacity`` at once, each for its lease time
        (``hold_s``: learned from the leases that ended; before one has, the decision gives the
        model's load time, ``states.step``). All zero for a model without a limit or a time."""
        c, h = self.capacity.get(model), self.hold_s.get(model, 0.0)
        if not c or h <= 0:
            return [0.0] * n
        return [(i // c) * h for i in range(n)]


@dataclass(frozen=True)
class Admission:
    grant: frozenset[int]  # waiter seqs to grant now
    drain: frozenset[str]  # resident models that take no new leases


def rank_targets(view: SchedulerView) -> list[str]:
    """Models that are not on the GPU and have waiters, best first (see the module docstring)."""
    candidates = [w for w in view.waiters if w.model not in view.on_gpu and w.model not in view.blocked]
    first_seq: dict[str, int] = {}
    for w in candidates:
        first_seq[w.model] = min(w.seq, first_seq.get(w.model, w.seq))
    if view.mode is not Mode.FAIR:
        return sorted(first_seq, key=lambda m: first_seq[m])

    best: dict[str, tuple[bool, int, float]] = {}
    for w in candidates:
        key = (view.overdue(w), w.priority, view.now_s - view.since_s(w))
        old = best.get(w.model)
        best[w.model] = key if old is None else max(old, key)
    # Ties (equal keys) go to the model whose first waiter arrived first.
    return sorted(best, key=lambda m: (*best[m], -first_seq[m]), reverse=True)


def choose_target(view: SchedulerView) -> str | None:
    """The model to switch in next, or None when no waiter needs a switch."""
    ranked = rank_targets(view)
    return ranked[0] if ranked else None


def drain_due_at(
    view: SchedulerView,
    target: str,
    evictees: frozenset[str],
    switch_cost_s: float | None = None,
) -> float:
    """When ``target``'s waiters will have waited long enough for ``evictees`` to drain.

    Each waiter's wait counts from when its model last lost the GPU (see the module
    docstring). Without ``switch_cost_s`` (the time rule): when the oldest has waited
    ``fairness_s``.

    With it (the cost rule, the default), when all three hold, or at the hard bound of the
    first two (the oldest waiter has waited ``max_wait_s`` since its arrival less
    ``BOUND_SHARE`` of the switch's cost, so that half the switch is done by ``max_wait_s``;
    the time a drain waits for the leases in progress comes on top). The share splits the
    switch between the waiter, served up to half a switch past ``max_wait_s``, and the busy
    model's users, who keep it half a switch longer: at the whole switch (the switch ending
    by ``max_wait_s``) the mixed trace at the design's switch costs made 8% more switches and
    a 2% longer makespan, for a max wait 7% shorter (docs/measurements.md#scheduling).
    The conditions:

    - one of the waiters will have waited ``FLOOR_SHARE`` of ``max_wait_s`` by the time its
      lease begins: a busy model is not taken away sooner however cheap the switch (every switch
      disrupts the users of the model it evicts), and ``max_wait_s`` stays the hard bound.
      A model that serves few at once (``max_concurrent``) serves its queue in turns of its
      lease time (``SchedulerView.queued_s``): the tenth waiter for an image model that
      draws one image in 8 s begins 72 s after the switch, so its floor comes 72 s sooner.
      Without it a queue that had built up behind a busy model waited for the floor and then
      for its own turns, and its last waiter past ``max_wait_s``. Before any lease on the
      model has ended, a turn is taken to last as long as the model's load: the first queue
      of the day builds up before anything is known of its leases;
    - the waiters' accumulated wait (the sum of their waits) has reached the price of the
      switch: ``PRICE_FACTOR`` times its cost (``switch_cost_s``: the evictees' unloads and
      the target's load or restore, as measured) for each user it holds up (the evictees'
      leases and waiters, plus one). A slow switch, or a busy evictee, makes the waiters wait
      longer; many waiters, or a cheap switch, drain at the floor;
    - oldest first: the target's oldest waiter arrived no later than the oldest waiter of
      the evictees (their queue past a capacity, ``max_concurrent``). A busy model is not
      drained for requests younger than its own: those were first, and the switch would make
      them wait for it and for the switch back. This one is not a time that comes by itself
      (both sides age alike): it holds until the evictees' older waiters are granted
      (``math.inf`` when that is what remains; an overdue waiter drains them all the same).

    The three constants were chosen on the scheduling benchmark's mixed trace (benchmarks/
    scheduling.py: chat agents, artists and workflows, at switch costs of 12-22 s and under
    1 s) as the setting that does best on both without per-trace tuning; the oldest-first
    condition has no constant.
    """
    waiters = sorted((w for w in view.waiters if w.model == target), key=lambda w: w.seq)
    oldest_s = min(view.since_s(w) for w in waiters)
    if switch_cost_s is None:
        return oldest_s + view.fairness_s
    bound_at = min(w.arrived_s for w in waiters) + view.max_wait_s - BOUND_SHARE * switch_cost_s
    held_up = 1 + sum(view.leases.get(m, 0) for m in evictees)
    held_up += sum(1 for w in view.waiters if w.model in evictees)
    price_s = PRICE_FACTOR * switch_cost_s * held_up
    accumulated_s = sum(view.now_s - view.since_s(w) for w in waiters)
    priced_at = view.now_s + max(0.0, price_s - accumulated_s) / len(waiters)
    queued = [w.arrived_s for w in view.waiters if w.model in evictees]
    if queued and min(w.arrived_s for w in waiters) > min(queued):
        return math.inf  # the evictees' own older waiters first
    turns = view.queued_s(target, len(waiters))
    floor_at = min(view.since_s(w) - t for w, t in zip(waiters, turns, strict=True))
    return min(bound_at, max(floor_at + FLOOR_SHARE * view.max_wait_s, priced_at))


def grace_ends_at(view: SchedulerView, evictees: frozenset[str], switch_cost_s: float) -> float | None:
    """Until when idle ``evictees`` stay for a user who may come back (None: they need not).

    A model whose last lease ended less than ``GRACE_SHARE`` of the switch's cost ago, held
    by a user who has come back to it before and is not waiting now (for this model or
    another), is kept that long (fair mode only). Such a user often asks again at once (an
    artist's next image, an agent's next turn): evicting the model in between costs two
    switches, and the switch back comes soon. If a lease is taken within the grace, the
    model is busy again and the drain rules of ``drain_due_at`` decide; if not, the switch
    goes, late by an eighth of its cost (ski rental: waiting is worth a share of what the
    switch costs). The runtime names only users who came back before (``last_release``): a
    request that is its own user (an API call) gets no grace, and a user who released the
    model and now waits for another one is not coming back to it. ``GRACE_SHARE`` was chosen
    on the same trace as ``drain_due_at``'s constants (a tenth before the queue was counted
    in turns; at a fifth of the cost or more, the model's returning users keep it too long
    from the waiters: docs/measurements.md#scheduling).
    """
    if view.mode is not Mode.FAIR:
        return None
    grace_s = GRACE_SHARE * switch_cost_s
    waiting = {w.holder for w in view.waiters}
    ends = [
        when_s + grace_s
        for m, (when_s, holder) in view.last_release.items()
        if m in evictees and holder not in waiting and when_s + grace_s > view.now_s
    ]
    return max(ends) if ends else None


def admission(
    view: SchedulerView,
    target: str | None,
    evictees: frozenset[str],
    switch_cost_s: float | None = None,
) -> Admission:
    """Grant leases on resident models, and say which must drain for ``target``.

    ``evictees`` are the resident models the target's plan evicts from the GPU;
    ``switch_cost_s``, when given, is what the switch would cost (the cost rule of
    ``drain_due_at``).
    """
    resident_waiters = [w for w in view.waiters if w.model in view.on_gpu]
    if target is None:
        return Admission(frozenset(w.seq for w in resident_waiters), frozenset())

    if view.mode is Mode.FCFS:
        head = min(w.seq for w in view.waiters if w.model == target)
        # Waiters that arrived before the head are served first, even on a model that is
        # about to be evicted (the switch then waits for their leases).
        grant = frozenset(w.seq for w in resident_waiters if w.seq < head)
        return Admission(grant, evictees)

    if view.mode is Mode.RESIDENT_FIRST:
        return Admission(frozenset(w.seq for w in resident_waiters), frozenset())

    target_waiters = [w for w in view.waiters if w.model == target]
    top = max(w.priority for w in target_waiters)
    evictee_prios = [w.priority for w in resident_waiters if w.model in evictees]
    outranks = bool(evictee_prios) and top > max(evictee_prios)
    overdue = any(view.overdue(w) for w in target_waiters)
    due = view.now_s >= drain_due_at(view, target, evictees, switch_cost_s) or overdue or outranks
    drain = evictees if due else frozenset()
    grant = frozenset(w.seq for w in resident_waiters if w.model not in drain)
    return Admission(grant, drain)
