"""Hundreds of tasks acquiring random models at once: every one is served, none waits past
the bound the scheduler promises, and the budget holds at every event."""

from __future__ import annotations

import dataclasses
import random

import anyio
import pytest

from orchestrator import Orchestrator
from orchestrator.config import load_config
from orchestrator.device.simulated import SimulatedDevice
from orchestrator.events import Event
from states.machine import State, active_state
from tests.orchestrator.conftest import wait_until

pytestmark = pytest.mark.anyio

MODELS = ["qwen-14b", "qwen-vl-7b", "sdxl-base", "sdxl-lora-controlnet", "gpt-sovits-small"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make(time_scale: float, fairness_s: float, max_wait_s: float) -> tuple[Orchestrator, SimulatedDevice]:
    config = dataclasses.replace(
        load_config(None),
        time_scale=time_scale,
        fairness="time",  # these tests are about the fairness_s bound
        fairness_s=fairness_s,
        max_wait_s=max_wait_s,
        load_timeout_s=5.0,
        unload_timeout_s=5.0,
    )
    device = SimulatedDevice(config.total_bytes)
    return Orchestrator(config, device=device), device


@pytest.mark.parametrize("seed", [1, 2])
async def test_hundreds_of_tasks_all_served_within_the_bound(seed: int) -> None:
    time_scale = 0.001  # the module's 20 s LLM start takes 20 ms
    hold_max_s = 0.004
    orch, device = make(time_scale, fairness_s=0.02, max_wait_s=0.15)
    budget = orch.config.budget_bytes
    violations: list[str] = []

    def check(e: Event) -> None:
        ledger = orch.ledger()
        if ledger.committed_bytes > budget:
            violations.append(f"committed {ledger.committed_bytes} > {budget} at {e}")
        if device.peak_owned_bytes > budget:
            violations.append(f"device peak {device.peak_owned_bytes} > {budget} at {e}")
        if e.kind == "transition" and e.to_state != "SWITCHING" and orch.state is not active_state(ledger):
            violations.append(f"state {orch.state} does not match the ledger at {e}")

    orch.add_listener(check)
    rng = random.Random(seed)
    waits: list[float] = []
    served: list[str] = []
    n_tasks = 300

    async def task(model: str, delay_s: float, hold_s: float) -> None:
        await anyio.sleep(delay_s)
        async with orch.acquire(model) as lease:
            waits.append(lease.waited_s)
            assert orch.ledger().on_gpu(model)
            await anyio.sleep(hold_s)
        served.append(model)

    with anyio.fail_after(60):
        async with orch, anyio.create_task_group() as tg:
            for _ in range(n_tasks):
                tg.start_soon(task, rng.choice(MODELS), rng.uniform(0, 1.0), rng.uniform(0, hold_max_s))

    assert not violations, violations[:3]
    assert len(served) == n_tasks  # every one served: no timeout, no error, no lost waiter
    stats = orch.statistics()
    assert stats.grants == stats.releases == n_tasks
    assert stats.timeouts == stats.cancellations == stats.failed_switches == 0
    assert orch.state is State.IDLE and device.used_bytes() == 0

    # The bound: a waiter becomes overdue after max_wait_s and then goes first; ahead of it are
    # at most the other models' overdue waiters, each costing a drain (one hold) and a switch
    # (an unload and a load, plus possibly a side load of a light model meanwhile).
    sims = [s.sim for s in orch.config.models.values() if s.sim is not None]
    switch_s = 2 * max(s.load_s + s.unload_s for s in sims) * time_scale
    bound_s = orch.config.max_wait_s + len(MODELS) * (hold_max_s + switch_s) + 0.05  # + loop slack
    assert max(waits) <= bound_s, (max(waits), bound_s)
    # And fairness is not only a bound: most waits are far below it.
    assert sorted(waits)[len(waits) // 2] < bound_s / 4


async def test_a_hot_model_does_not_starve_the_others() -> None:
    """Back-to-back leases on the LLM from many tasks; an SDXL request still gets in, within
    the fairness bound plus one drain and one switch."""
    time_scale = 0.001
    orch, _ = make(time_scale, fairness_s=0.03, max_wait_s=1.0)
    stop = anyio.Event()

    async def hot() -> None:
        while not stop.is_set():
            async with orch.acquire("llm"):
                await anyio.sleep(0.002)

    with anyio.fail_after(30):
        async with orch, anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(hot)
            await wait_until(lambda: orch.leases().get("qwen-14b", 0) > 0, what="the LLM loaded and busy")
            async with orch.acquire("sdxl") as lease:
                sdxl_wait = lease.waited_s
            stop.set()
    sims = orch.config.models
    switch_s = (sims["qwen-14b"].sim.unload_s + sims["sdxl-base"].sim.load_s) * time_scale  # type: ignore[union-attr]
    assert sdxl_wait <= orch.config.fairness_s + 0.002 + switch_s + 0.05
    assert sdxl_wait >= orch.config.fairness_s  # it did let the hot model keep going for a while
