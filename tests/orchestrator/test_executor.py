"""The executor's one unload path, from each of its five call sites.

Every unload (a switch's eviction, an eviction that loads nothing because the room shrank, a
requested unload, the shutdown, the reaping of a leftover) goes through one path: the backend
call, a second, shielded unload when it fails, the ledger updated after success, one event,
the verified release. Here each call site meets an unload that fails once: the second try
succeeds, so the memory must come back and the ledger must say so at every one of them.
"""

from __future__ import annotations

import logging

import anyio
import pytest

from orchestrator.errors import UnloadFailed
from orchestrator.events import Event
from orchestrator.runtime import Orchestrator
from states.machine import State
from states.units import gib_to_bytes
from tests.orchestrator.conftest import device_of, wait_until
from tests.orchestrator.test_acquire import MakeOrch, assert_settled, simulated

pytestmark = pytest.mark.anyio


def _events(orch: Orchestrator) -> list[Event]:
    events: list[Event] = []
    orch.add_listener(events.append)
    return events


def _retried_evictions(events: list[Event], model: str) -> list[Event]:
    return [
        e
        for e in events
        if e.kind == "evict" and e.model == model and "after a failed unload" in (e.detail or "")
    ]


async def test_a_switch_whose_eviction_fails_once_frees_the_memory_and_fails_its_waiter(
    orch: Orchestrator,
) -> None:
    async with orch:
        async with orch.acquire("llm"):
            pass
        events = _events(orch)
        simulated(orch, "qwen-14b").faults.fail_unloads = 1
        with anyio.fail_after(2), pytest.raises(UnloadFailed, match="while evicting it for 'sdxl-base'"):
            async with orch.acquire("sdxl"):
                pytest.fail("granted although the eviction raised")
        assert _retried_evictions(events, "qwen-14b")
        assert not orch.ledger().on_gpu("qwen-14b")
        assert device_of(orch).held_by("qwen-14b") == 0
        assert_settled(orch)
        with anyio.fail_after(2):  # the back-off passes and the switch goes through
            async with orch.acquire("sdxl"):
                assert orch.state is State.SDXL_ACTIVE


async def test_an_eviction_for_foreign_memory_that_fails_once_still_makes_room(orch: Orchestrator) -> None:
    device = device_of(orch)
    async with orch:
        async with orch.acquire("llm"):
            pass
        events = _events(orch)
        simulated(orch, "qwen-14b").faults.fail_unloads = 1
        device.take_foreign(4242, gib_to_bytes(4.25))  # the room (15.5 - 4.25 GiB) shrinks below the LLM
        await wait_until(lambda: not orch.ledger().on_gpu("qwen-14b"), what="the LLM evicted for the room")
        assert device.held_by("qwen-14b") == 0
        retried = _retried_evictions(events, "qwen-14b")
        assert retried and "over the room" in (retried[0].detail or "")
        assert orch.state is State.IDLE
        device.release_foreign(4242)


async def test_a_requested_unload_that_fails_once_returns_with_the_memory_back(orch: Orchestrator) -> None:
    async with orch:
        async with orch.acquire("llm"):
            pass
        events = _events(orch)
        simulated(orch, "qwen-14b").faults.fail_unloads = 1
        with anyio.fail_after(2):
            await orch.unload("llm")
        assert orch.ledger().get("qwen-14b") is None
        assert device_of(orch).held_by("qwen-14b") == 0
        retried = _retried_evictions(events, "qwen-14b")
        assert retried and "unload requested" in (retried[0].detail or "")
        assert_settled(orch)


async def test_a_shutdown_whose_unload_fails_once_unloads_everything(
    orch: Orchestrator, caplog: pytest.LogCaptureFixture
) -> None:
    async with orch:
        async with orch.acquire("llm"):
            pass
        events = _events(orch)
        simulated(orch, "qwen-14b").faults.fail_unloads = 1
    assert device_of(orch).holders() == {}
    assert orch.ledger().residents == ()
    assert orch.state is State.IDLE
    assert _retried_evictions(events, "qwen-14b")
    report = orch.shutdown_report
    assert report is not None
    assert (report.unloaded, report.failed) == (["qwen-14b"], {})
    assert str(report) == "unloaded qwen-14b"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_leftover_whose_reaping_fails_once_is_reaped(make_orch: MakeOrch) -> None:
    orch = make_orch(retry_backoff_s=0.01)
    device = device_of(orch)
    async with orch:
        events = _events(orch)
        qwen = simulated(orch, "qwen-14b")
        # The load fails and its cleanup's unload fails too: the memory stays, the ledger no
        # longer counts it (it is foreign meanwhile). The reaper's first unload fails as well;
        # its second, shielded try works.
        qwen.faults.fail_loads = 1
        qwen.faults.fail_unloads = 2
        with anyio.fail_after(2), pytest.raises(Exception, match="injected load failure"):
            async with orch.acquire("llm"):
                pytest.fail("granted although the load failed")
        await wait_until(lambda: device.held_by("qwen-14b") == 0, what="the leftover reaped")
        reaped = [
            e for e in events if e.kind == "evict" and "left over by a failed cleanup" in (e.detail or "")
        ]
        assert reaped and "after a failed unload" in (reaped[0].detail or "")
        assert orch.ledger().get("qwen-14b") is None
        assert_settled(orch)
        with anyio.fail_after(2):  # and the model loads again once its back-off passes
            async with orch.acquire("llm"):
                assert orch.state is State.LLM_ACTIVE
