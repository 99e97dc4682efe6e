"""Properties of ``plan()`` over random ledgers and requests.

For any consistent ledger (GPU residents within the budget, at most one exclusive model on the
GPU, host copies within the host budget; foreign memory may be anything) and any request for a
model that is not on the GPU, ``plan()``:

- raises ``InsufficientVRAM`` exactly when the request is larger than the whole budget;
- returns ``Deferred`` exactly when even evicting everything leaves too little room;
- otherwise returns a ``Plan`` whose ``after`` ledger fits, holds no two exclusive models on the
  GPU, keeps the host tier within its budget, and evicts no more than needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from states import (
    MIB,
    Deferred,
    InsufficientVRAM,
    Ledger,
    ModelMachine,
    Plan,
    PlanRequest,
    Policy,
    Resident,
    State,
    Tier,
    active_state,
    plan,
)

POLICY = Policy()
KINDS = ("llm", "sdxl", "tts")

DOWNWARD = {(Tier.GPU, Tier.HOST), (Tier.GPU, Tier.DISK), (Tier.HOST, Tier.DISK)}
SETTINGS = settings(max_examples=200, deadline=None, database=None)


@dataclass(frozen=True)
class Case:
    ledger: Ledger
    request: PlanRequest


@st.composite
def cases(draw: st.DrawFn) -> Case:
    budget_mib = draw(st.integers(256, 40 * 1024))
    foreign_mib = draw(st.one_of(st.just(0), st.integers(0, budget_mib + 1024)))
    n = draw(st.integers(0, 6))
    clocks = draw(st.permutations(list(range(1, n + 1))))  # distinct last_used values

    residents: list[Resident] = []
    gpu_mib = 0
    host_mib_used = 0
    gpu_has_exclusive = False
    for i in range(n):
        kind = draw(st.sampled_from(KINDS))
        exclusive = POLICY.is_exclusive(kind)
        vram_mib = draw(st.integers(1, budget_mib))
        offloadable = draw(st.booleans())
        host_mib = draw(st.integers(1, vram_mib)) if offloadable else draw(st.sampled_from([0, 0, 512]))
        on_gpu_ok = gpu_mib + vram_mib <= budget_mib and not (exclusive and gpu_has_exclusive)
        wants_gpu = draw(st.integers(0, 2)) > 0 if offloadable else True
        if wants_gpu and on_gpu_ok:
            tier = Tier.GPU
            gpu_mib += vram_mib
            gpu_has_exclusive |= exclusive
        elif offloadable:
            tier = Tier.HOST
            host_mib_used += host_mib
        else:
            continue
        residents.append(
            Resident(
                model=f"m{i}",
                kind=kind,
                vram_bytes=vram_mib * MIB,
                tier=tier,
                exclusive=exclusive,
                offloadable=offloadable,
                host_bytes=host_mib * MIB,
                last_used=clocks[i],
            )
        )
    # The host tier holds its copies, with no room to spare (often) or some.
    slack = st.sampled_from([0, budget_mib // 2, budget_mib, 2 * budget_mib]) | st.integers(0, budget_mib)
    host_budget_mib = host_mib_used + draw(st.just(0) | slack if host_mib_used else slack)
    ledger = Ledger(
        budget_bytes=budget_mib * MIB,
        residents=tuple(residents),
        foreign_bytes=foreign_mib * MIB,
        host_budget_bytes=host_budget_mib * MIB,
        clock=n,
    )

    on_host = [r for r in residents if r.tier is Tier.HOST]
    restore = draw(st.one_of(st.none(), st.sampled_from(on_host))) if on_host else None
    kind = restore.kind if restore is not None else draw(st.sampled_from(KINDS))
    vram_mib = draw(st.integers(1, budget_mib + budget_mib // 4 + 1))
    offloadable = draw(st.booleans())
    request = PlanRequest(
        model=restore.model if restore is not None else "wanted",
        kind=kind,
        vram_bytes=vram_mib * MIB,
        offloadable=offloadable,
        host_bytes=draw(st.integers(1, vram_mib)) * MIB if offloadable else 0,
    )
    return Case(ledger, request)


def _conflict(request: PlanRequest, victim: Resident) -> bool:
    return POLICY.is_exclusive(request.kind) and victim.exclusive


def _rank(r: Resident) -> tuple[bool, int]:
    return (r.exclusive, r.last_used)


@SETTINGS
@given(cases())
def test_plan_properties(case: Case) -> None:
    ledger, request = case.ledger, case.request

    try:
        result = plan(request, ledger, POLICY)
    except InsufficientVRAM as err:
        assert request.vram_bytes > ledger.budget_bytes
        assert err.model == request.model
        assert err.shortfall_bytes == request.vram_bytes - ledger.budget_bytes
        return
    assert request.vram_bytes <= ledger.budget_bytes

    if isinstance(result, Deferred):
        # Even with everything of ours evicted the room is too small.
        assert request.vram_bytes > ledger.available_bytes
        assert result.needed_bytes == request.vram_bytes
        assert result.available_bytes == ledger.available_bytes
        assert result.foreign_bytes == ledger.foreign_bytes
        return

    assert isinstance(result, Plan)
    assert request.vram_bytes <= ledger.available_bytes
    after = result.after

    # The load is committed and the result fits.
    assert result.load == request.model
    assert result.load_bytes == request.vram_bytes
    assert result.from_tier is ledger.tier_of(request.model)
    assert after.loading is not None and after.loading.model == request.model
    assert after.loading.vram_bytes == request.vram_bytes
    assert after.get(request.model) is None
    assert after.fits()
    assert after.committed_bytes <= after.available_bytes <= after.budget_bytes

    # Never two exclusive models on the GPU (the load counts).
    assert sum(r.exclusive for r in (*after.gpu_residents, after.loading)) <= 1

    # The host tier stays within its budget.
    assert after.host_used_bytes <= after.host_budget_bytes

    # Each eviction moves a model down from where it was, to where `after` says it is.
    names = [e.model for e in result.evictions]
    assert len(names) == len(set(names))
    assert request.model not in names
    for e in result.evictions:
        before = ledger.get(e.model)
        assert before is not None and before.tier is e.from_tier
        assert (e.from_tier, e.to_tier) in DOWNWARD
        assert after.tier_of(e.model) is e.to_tier
        if e.to_tier is Tier.HOST:
            assert before.offloadable and before.host_bytes > 0
    # Everything not evicted stays as it was.
    for r in ledger.residents:
        if r.model not in names and r.model != request.model:
            assert after.get(r.model) == r

    # Evictions are exclusive conflicts or needed, in the documented order.
    gpu_victims = [ledger.get(e.model) for e in result.gpu_evictions]
    assert all(v is not None for v in gpu_victims)
    optional = [v for v in gpu_victims if v is not None and not _conflict(request, v)]
    if optional:
        # No more than needed: keeping any one of them would not fit.
        for v in optional:
            assert after.committed_bytes + v.vram_bytes > after.available_bytes
        # Chosen in the documented order (light before heavy, least recently used first) ...
        assert [_rank(v) for v in optional] == sorted(_rank(v) for v in optional)
        # ... and the order was followed: evicting everything that ranks below the last one
        # chosen would not have made room, so the planner had to go as far as it.
        last = optional[-1]
        candidates = [r for r in ledger.gpu_residents if not _conflict(request, r)]
        room = ledger.available_bytes - sum(r.vram_bytes for r in candidates)
        below = [r for r in candidates if _rank(r) < _rank(last)]
        assert room + sum(r.vram_bytes for r in below) < request.vram_bytes

    _check_host_tier(ledger, result)

    # The state machine accepts the plan and lands where the ledger says.
    machine = ModelMachine()
    assert machine.fire("settle", ledger) is active_state(ledger)
    assert machine.fire("begin_switch", after) is State.SWITCHING
    done = after.finish_load()
    assert machine.fire("finish_switch", done) is active_state(done)
    assert done.on_gpu(request.model)


def _check_host_tier(ledger: Ledger, result: Plan) -> None:
    """Host copies are kept most recently used first: whatever goes to DISK though it has a host
    copy (a dropped host copy, or an offloadable victim) did not fit beside the more recently used
    copies that were kept, and a host copy is dropped only for a more recently used victim."""
    after = result.after
    to_host = [ledger.get(e.model) for e in result.gpu_evictions if e.to_tier is Tier.HOST]
    for e in result.evictions:
        if e.to_tier is not Tier.DISK:
            continue
        r = ledger.get(e.model)
        assert r is not None
        if e.from_tier is Tier.HOST:
            assert any(v is not None and v.last_used > r.last_used for v in to_host)
        elif not (r.offloadable and r.host_bytes > 0):
            continue
        newer = sum(k.host_bytes for k in after.host_residents if k.last_used > r.last_used)
        assert newer + r.host_bytes > after.host_budget_bytes


@st.composite
def host_cases(draw: st.DrawFn) -> Case:
    """A full (or nearly full) host tier, and an exclusive switch whose victim could offload."""
    gib = 1024
    copies = draw(st.lists(st.integers(1, 16 * gib), min_size=1, max_size=4))
    victim_host_mib = draw(st.integers(1, 16 * gib))
    clocks = draw(st.permutations(list(range(1, len(copies) + 2))))
    residents = [
        Resident(
            f"h{i}",
            "sdxl",
            size * MIB,
            tier=Tier.HOST,
            exclusive=True,
            offloadable=True,
            host_bytes=size * MIB,
            last_used=clocks[i],
        )
        for i, size in enumerate(copies)
    ]
    victim = Resident(
        "victim",
        draw(st.sampled_from(["llm", "sdxl"])),
        10 * gib * MIB,
        exclusive=True,
        offloadable=True,
        host_bytes=victim_host_mib * MIB,
        last_used=clocks[-1],
    )
    light = draw(st.booleans())
    if light:
        # Used least recently of all, so it never takes host room the victim could have.
        residents.append(
            Resident("rider", "tts", 2 * gib * MIB, offloadable=True, host_bytes=gib * MIB, last_used=0)
        )
    slack = draw(st.sampled_from([0, 0, 512, 4 * gib]))
    ledger = Ledger(
        budget_bytes=16 * gib * MIB,
        residents=(*residents, victim),
        host_budget_bytes=(sum(copies) + slack) * MIB,
        clock=len(clocks) + 1,
    )
    size = draw(st.sampled_from([8 * gib, 15 * gib]))  # rides with the light model, or not
    return Case(ledger, PlanRequest("wanted", draw(st.sampled_from(["llm", "sdxl"])), size * MIB))


@SETTINGS
@given(host_cases())
def test_host_tier_keeps_the_most_recent_copies(case: Case) -> None:
    result = plan(case.request, case.ledger, POLICY)
    assert isinstance(result, Plan)
    assert result.after.host_used_bytes <= result.after.host_budget_bytes
    assert result.gpu_evictions[0].model == "victim"
    _check_host_tier(case.ledger, result)
    victim = case.ledger.get("victim")
    assert victim is not None
    older = [r for r in case.ledger.host_residents if r.last_used < victim.last_used]
    newer = [r for r in case.ledger.host_residents if r.last_used > victim.last_used]
    room = case.ledger.host_budget_bytes - sum(r.host_bytes for r in newer)
    to_tier = result.gpu_evictions[0].to_tier
    # The victim goes to HOST exactly when it fits beside the more recent copies; older copies
    # are dropped only then, and only as many as needed (most recent kept first).
    assert (to_tier is Tier.HOST) is (victim.host_bytes <= room)
    dropped = {e.model for e in result.evictions if e.from_tier is Tier.HOST}
    assert all(r.last_used < victim.last_used for r in case.ledger.host_residents if r.model in dropped)
    if to_tier is Tier.DISK:
        assert dropped == set()
    else:
        assert not any(r.model in dropped for r in newer)
        assert len(dropped) <= len(older)


@SETTINGS
@given(cases())
def test_planning_for_a_gpu_resident_is_refused(case: Case) -> None:
    ledger = case.ledger
    for r in ledger.gpu_residents:
        request = PlanRequest(r.model, r.kind, r.vram_bytes)
        try:
            plan(request, ledger, POLICY)
        except ValueError as err:
            assert "already on the GPU" in str(err)
        else:  # pragma: no cover - a failure
            raise AssertionError(f"planned {r.model!r}, which is already on the GPU")
