"""What crosses between machines without Ray: errors rebuilt as their own class, and the
router's view of a snapshot with the requests it sent since."""

from __future__ import annotations

from orchestrator.cluster.snapshot import MachineSnapshot
from orchestrator.cluster.wire import ClusterError, from_wire, to_wire
from orchestrator.errors import AcquireTimeout, UnknownModel
from states import LeaseDeadlock, Ledger, Policy
from states.cards import Cards


def test_our_errors_come_back_as_themselves_with_their_facts() -> None:
    timeout = from_wire(to_wire(AcquireTimeout("sdxl-base", 2.5, 3, 4, "qwen-14b (11.50 GiB)")), node="m1")
    assert isinstance(timeout, AcquireTimeout) and isinstance(timeout, TimeoutError)
    assert (timeout.model, timeout.timeout_s, timeout.position, timeout.queued) == ("sdxl-base", 2.5, 3, 4)
    assert "within 2.5 s" in str(timeout)
    unknown = from_wire(to_wire(UnknownModel("nope", ["a"], ["llm"])), node="m1")
    assert isinstance(unknown, UnknownModel) and unknown.name == "nope" and "unknown model" in str(unknown)
    deadlock = from_wire(to_wire(LeaseDeadlock("sdxl-base", "qwen-14b")), node="m1")
    assert isinstance(deadlock, LeaseDeadlock) and deadlock.held == "qwen-14b"


def test_other_errors_arrive_named_as_cluster_errors() -> None:
    err = from_wire(to_wire(KeyError("x")), node="m2")
    assert isinstance(err, ClusterError) and str(err) == "machine m2: KeyError: 'x'"
    forged = {"module": "os", "name": "system", "message": "no", "attrs": {}}
    assert isinstance(from_wire(forged, node="m2"), ClusterError)  # only this project's classes


def snapshot(leases: dict[str, int], waiting: dict[str, int]) -> MachineSnapshot:
    cards = Cards.single(Ledger(budget_bytes=100))
    return MachineSnapshot(
        "m0", "abcd0123", 7, cards, requests={}, names={}, policy=Policy(), leases=leases, waiting=waiting
    )


def test_the_view_counts_what_the_router_did_since_the_snapshot() -> None:
    snap = snapshot(leases={"llm": 2}, waiting={"sdxl": 1})
    view = snap.view(pending={"sdxl": 3, "tts": 1}, leases={"llm": -1, "tts": 1})
    assert dict(view.waiting) == {"sdxl": 3, "tts": 1}  # the larger of the two counts
    assert dict(view.leases) == {"llm": 1, "tts": 1}  # the snapshot's, plus grants, less releases
    assert dict(snap.view(leases={"llm": -5}).leases) == {}  # never below zero
    assert snap.view(alive=False).alive is False
    assert snap.ledger.budget_bytes == 100
