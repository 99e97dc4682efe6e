"""Capacity per model (``max_concurrent``): the scheduler grants at most that many leases at
once on a model and keeps the rest as waiters it sees, so waits are measured to the real
start of work and a drain waits only for the work in progress."""

from __future__ import annotations

import statistics

import anyio
import pytest

from orchestrator.events import Event
from orchestrator.runtime import Orchestrator
from tests.orchestrator.conftest import build_config, wait_until

pytestmark = pytest.mark.anyio

MODELS = """\
qwen-14b: {kind: llm, vram_gb: 11.5}
sdxl-base: {kind: sdxl, vram_gb: 10.5, offload: true, host_gb: 6.5, max_concurrent: 1}
gpt-sovits-small: {kind: tts, vram_gb: 3.5, max_concurrent: 2}
"""


def most_at_once(events: list[Event], model: str) -> int:
    held = top = 0
    for e in events:
        if e.model == model and e.kind == "grant":
            held += 1
            top = max(top, held)
        elif e.model == model and e.kind == "release":
            held -= 1
    return top


async def test_a_capacity_one_model_serves_one_at_a_time_and_waits_are_measured_to_the_start() -> None:
    orch = Orchestrator(build_config(MODELS))
    events: list[Event] = []
    orch.add_listener(events.append)
    outside: list[float] = []
    inside: list[float] = []

    async def artist() -> None:
        t0 = anyio.current_time()
        async with orch.acquire("sdxl") as lease:
            outside.append(anyio.current_time() - t0)  # from acquire() to the start of work
            inside.append(lease.waited_s)
            await lease.handle.run("a drawing", work_s=5.0)  # 5 ms at the tests' time scale

    async with orch:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(artist)
        stats = orch.statistics()
    assert most_at_once(events, "sdxl-base") == 1
    assert len(outside) == 8
    # Each wait, as the lease and the statistics report it, is the wait the caller saw.
    for seen, reported in zip(outside, inside, strict=True):
        assert abs(seen - reported) < 0.002, (seen, reported)
    assert stats.waits.count == 8
    assert stats.waits.mean_s == pytest.approx(statistics.fmean(outside), abs=0.002)
    assert stats.waits.max_s == pytest.approx(max(outside), abs=0.002)
    # Later artists waited behind earlier ones' work, and that wait is counted.
    assert max(outside) > 5 * 0.005


async def test_a_capacity_two_model_takes_two_leases_at_once() -> None:
    orch = Orchestrator(build_config(MODELS))
    events: list[Event] = []
    orch.add_listener(events.append)

    async def speaker() -> None:
        async with orch.acquire("gpt-sovits-small") as lease:
            await lease.handle.run("a line", work_s=5.0)

    async with orch:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(6):
                    tg.start_soon(speaker)
    assert most_at_once(events, "gpt-sovits-small") == 2


async def test_a_drain_waits_for_the_image_in_progress_not_for_the_queue_behind_it() -> None:
    orch = Orchestrator(build_config(MODELS, fairness_s=0.01))
    order: list[str] = []
    first_started = anyio.Event()
    finish_first = anyio.Event()

    async def first_artist() -> None:
        async with orch.acquire("sdxl"):
            first_started.set()
            await finish_first.wait()
        order.append("sdxl 0")

    async def artist(i: int) -> None:
        async with orch.acquire("sdxl"):
            order.append(f"sdxl {i}")

    async def writer() -> None:
        async with orch.acquire("llm"):
            order.append("llm")

    async with orch:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first_artist)
                await first_started.wait()
                for i in (1, 2, 3):
                    tg.start_soon(artist, i)
                await wait_until(lambda: len(orch.waiting()) == 3, what="three artists queued")
                tg.start_soon(writer)
                await wait_until(
                    lambda: any(m == "qwen-14b" and waited > 0.01 for m, _, waited in orch.waiting()),
                    what="the LLM waiter past the fairness bound",
                )
                finish_first.set()
    # The switch to the LLM came right after the image in progress; the queued artists were
    # served after it (by the switch back), not before it.
    assert order[:2] == ["sdxl 0", "llm"], order
    assert sorted(order[2:]) == ["sdxl 1", "sdxl 2", "sdxl 3"]
