"""A machine's snapshots as its router takes them, without Ray: the actor runs in this event
loop, and the router's side of it (``Links``, ``MachineLink``) is driven by hand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from orchestrator.cluster.actor import LeaseRequest, OrchestratorActor
from orchestrator.cluster.links import Links
from orchestrator.cluster.machines import MachineLink
from orchestrator.cluster.snapshot import MachineSnapshot
from tests.orchestrator.conftest import config_yaml, wait_until

MODELS = """\
qwen-14b: {kind: llm, vram_gb: 11.5}
sdxl-base: {kind: sdxl, vram_gb: 10.5, max_concurrent: 1}
"""
WITHIN_S = 10.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # (the actor is an asyncio actor)


@pytest.fixture
async def actor() -> AsyncIterator[OrchestratorActor]:
    a = OrchestratorActor("m0", config_text=config_yaml(MODELS, None))
    try:
        yield a
    finally:
        await a.stop()


def ask(request_id: str, holder: str) -> tuple[Any, ...]:
    return tuple(LeaseRequest(request_id, "sdxl-base", None, 0, WITHIN_S, 30.0, holder))


async def test_a_grant_brings_a_snapshot_newer_than_one_built_between_its_event_and_its_lease(
    actor: OrchestratorActor,
) -> None:
    """A snapshot built in the instant of a grant (here: by a listener of the grant's event)
    counts the lease but not yet its id. The grant's answer brings a newer one at the same
    version, and a router that released the lease at once counts it no longer."""
    first = await actor.open(ask("r1", "one agent"))
    orch, leases = await actor._started()
    in_between: list[MachineSnapshot] = []

    def at_grant(e: Any) -> None:
        if e.kind == "grant" and not in_between:
            in_between.append(actor._snapshot(orch, leases))  # (the poll's snapshot, built now)

    with anyio.fail_after(WITHIN_S):
        second_call = asyncio.ensure_future(actor.open(ask("r2", "another agent")))
        await wait_until(lambda: bool(orch.waiting()), what="the second request waits for the one slot")
        remove = orch.add_listener(at_grant)
        await actor.release(first["lease"]["id"])
        second = await second_call
    remove()

    [gap] = in_between
    lease_id = second["lease"]["id"]
    assert dict(gap.leases) == {"sdxl-base": 1} and lease_id not in gap.lease_ids
    reply = second["snapshot"]
    assert reply.version == gap.version and reply.newer_than(gap) and not gap.newer_than(reply)
    assert lease_id in reply.lease_ids and dict(reply.leases) == {"sdxl-base": 1} and not reply.waiting

    # the router: the poll's snapshot came first, then the grant's answer
    links, m = Links(ttl_s=30.0), MachineLink("m0", handle=None)
    links.apply(m, gap)
    links.apply(m, reply)
    assert m.snapshot is reply
    links.apply(m, gap)  # (one that comes late is older: kept out)
    assert m.snapshot is reply
    # the block ended at once: the release is out, its answer not back
    m.changes.append((int(second["lease"]["version"]), "sdxl-base", 1))
    m.releasing[lease_id] = ("sdxl-base", int(second["lease"]["version"]))
    view = m.view()
    assert view is not None and view.load == 0, (dict(view.leases), dict(view.waiting))


async def test_a_grant_after_a_snapshot_that_counted_its_request_waiting_brings_a_newer_one(
    actor: OrchestratorActor,
) -> None:
    first = await actor.open(ask("r1", "one agent"))
    orch, _ = await actor._started()
    with anyio.fail_after(WITHIN_S):
        second_call = asyncio.ensure_future(actor.open(ask("r2", "another agent")))
        await wait_until(lambda: bool(orch.waiting()), what="the second request waits")
        waiting = await actor.snapshot()  # (nothing but grants and releases happen after it)
        await actor.release(first["lease"]["id"])
        second = await second_call
    assert dict(waiting.waiting) == {"sdxl-base": 1}
    reply = second["snapshot"]
    assert reply.newer_than(waiting) and not reply.waiting and second["lease"]["id"] in reply.lease_ids
