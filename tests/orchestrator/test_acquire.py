"""``Orchestrator.acquire()`` end to end on the simulated 16 GiB card: sharing, switching, the
host tier, timeouts, cancellation, backend faults, foreign memory, deadlocks, fairness,
priority, shutdown, statistics and events.

Latencies run at time scale 0.001 (an LLM load takes 20 ms), so every test is quick; waits
that could hang are guarded with ``anyio.fail_after``.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import anyio
import pytest
from anyio.abc import TaskStatus

from orchestrator.backends.simulated import SimulatedBackend, SimulatedModel
from orchestrator.config import Config
from orchestrator.device.simulated import SimulatedDevice
from orchestrator.errors import (
    AcquireTimeout,
    BackendOutOfMemory,
    LeaseDeadlock,
    LoadFailed,
    NotRunning,
    UnknownModel,
    UnloadFailed,
    VRAMNotReleased,
)
from orchestrator.events import Event
from orchestrator.runtime import Lease, Orchestrator
from states.ledger import Tier
from states.machine import State, active_state
from states.units import gib_to_bytes
from tests.orchestrator.conftest import device_of, wait_until

pytestmark = pytest.mark.anyio

MakeOrch = Callable[..., Orchestrator]

QWEN = gib_to_bytes(11.5)
SDXL = gib_to_bytes(10.5)
TTS = gib_to_bytes(3.5)
BUDGET = gib_to_bytes(15.5)


async def hold(
    orch: Orchestrator,
    model: str,
    release: anyio.Event,
    *,
    task_status: TaskStatus[Lease] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Hold a lease on ``model`` until ``release`` is set (use with ``tg.start``)."""
    async with orch.acquire(model) as lease:
        task_status.started(lease)
        await release.wait()


def assert_settled(orch: Orchestrator) -> None:
    """Not switching; the state, the ledger and the device agree; within the budget."""
    ledger = orch.ledger()
    assert orch.state is not State.SWITCHING
    assert ledger.loading is None
    assert orch.state == active_state(ledger)
    assert ledger.committed_bytes <= ledger.budget_bytes
    device = device_of(orch)
    for name in orch.backends:
        assert (device.held_by(name) > 0) == ledger.on_gpu(name), (name, device.holders(), ledger.describe())


def on_gpu(orch: Orchestrator) -> set[str]:
    return {r.model for r in orch.ledger().gpu_residents}


def simulated(orch: Orchestrator, name: str) -> SimulatedBackend:
    backend = orch.backends[name]
    assert isinstance(backend, SimulatedBackend)
    return backend


# -- basics ------------------------------------------------------------------------------------


async def test_acquire_by_kind_gives_the_default_model(orch: Orchestrator) -> None:
    async with orch:
        async with orch.acquire("llm") as lease:
            assert (lease.model, lease.kind, lease.priority) == ("qwen-14b", "llm", 0)
            assert isinstance(lease.handle, SimulatedModel)
            assert await lease.handle.run("hello", work_s=0) == "[qwen-14b (simulated llm)] hello"
            assert lease.waited_s >= 0
            assert orch.state is State.LLM_ACTIVE
            assert orch.leases() == {"qwen-14b": 1}
            assert device_of(orch).held_by("qwen-14b") == QWEN
        assert orch.leases() == {}
        assert orch.state is State.LLM_ACTIVE  # it stays resident after the lease


async def test_acquire_by_name(orch: Orchestrator) -> None:
    async with orch:
        async with orch.acquire("sdxl-lora") as lease:
            assert (lease.model, lease.kind) == ("sdxl-lora", "sdxl")
            assert orch.state is State.SDXL_ACTIVE
            assert on_gpu(orch) == {"sdxl-lora"}
        async with orch.acquire("gpt-sovits-small", priority=3) as lease:
            assert (lease.model, lease.kind, lease.priority) == ("gpt-sovits-small", "tts", 3)


async def test_an_unknown_name_lists_the_models(orch: Orchestrator) -> None:
    async with orch:
        with pytest.raises(UnknownModel) as info:
            async with orch.acquire("qwen-15b"):
                pytest.fail("granted a model that does not exist")
    err = info.value
    assert isinstance(err, LookupError)
    assert err.name == "qwen-15b"
    msg = str(err)
    assert "'qwen-15b'" in msg
    for name in orch.config.models:
        assert name in msg
    assert "llm, sdxl, tts" in msg  # the kinds with a default
    assert orch.statistics().grants == 0


async def test_acquire_outside_async_with_raises_not_running(orch: Orchestrator) -> None:
    with pytest.raises(NotRunning, match="async with orch"):
        async with orch.acquire("llm"):
            pytest.fail("granted outside `async with orch`")
    async with orch:
        async with orch.acquire("llm"):
            pass
    with pytest.raises(NotRunning):
        async with orch.acquire("llm"):
            pytest.fail("granted after `async with orch` ended")


async def test_a_negative_timeout_is_refused(orch: Orchestrator) -> None:
    async with orch:
        with pytest.raises(ValueError, match="timeout"):
            async with orch.acquire("llm", timeout=-1):
                pytest.fail("granted with a negative timeout")
        assert orch.waiting() == []


async def test_the_orchestrator_cannot_be_entered_twice(orch: Orchestrator) -> None:
    async with orch:
        with pytest.raises(RuntimeError, match="already running"):
            await orch.__aenter__()


# -- sharing and switching ---------------------------------------------------------------------


async def test_concurrent_leases_on_one_model_share_one_load(orch: Orchestrator) -> None:
    both_in = anyio.Event()
    both_counted = anyio.Event()
    inside = 0
    counts: list[int] = []

    async def user() -> None:
        nonlocal inside
        async with orch.acquire("llm"):
            inside += 1
            if inside == 2:
                both_in.set()
            with anyio.fail_after(2):
                await both_in.wait()
                counts.append(orch.leases()["qwen-14b"])
                if len(counts) == 2:
                    both_counted.set()
                await both_counted.wait()

    async with orch:
        async with anyio.create_task_group() as tg:
            tg.start_soon(user)
            tg.start_soon(user)
        assert counts == [2, 2]
        assert simulated(orch, "qwen-14b").loads == 1
        stats = orch.statistics()
        assert (stats.loads, stats.switches, stats.grants) == (1, 1, 2)


async def test_a_light_model_rides_along_with_a_heavy_one(orch: Orchestrator) -> None:
    async with orch:
        async with orch.acquire("llm"):
            # The same task takes the TTS while it holds the LLM: no eviction is needed.
            with anyio.fail_after(2):
                async with orch.acquire("tts") as tts:
                    assert tts.model == "gpt-sovits-small"
                    assert on_gpu(orch) == {"qwen-14b", "gpt-sovits-small"}
                    assert orch.leases() == {"qwen-14b": 1, "gpt-sovits-small": 1}
                    assert orch.state is State.LLM_ACTIVE  # the heavy model names the state
                    assert device_of(orch).owned_bytes() == QWEN + TTS
        stats = orch.statistics()
        assert stats.evictions == 0
        assert stats.loads == 2
        assert_settled(orch)


async def test_an_exclusive_switch_evicts_the_other_heavy_model(orch: Orchestrator) -> None:
    async with orch:
        async with orch.acquire("llm"):
            pass
        async with orch.acquire("sdxl") as lease:
            assert lease.model == "sdxl-base"
            assert on_gpu(orch) == {"sdxl-base"}
            assert orch.state is State.SDXL_ACTIVE
            device = device_of(orch)
            assert device.held_by("qwen-14b") == 0
            assert device.held_by("sdxl-base") == SDXL
            # qwen-14b keeps no host copy (offload is off): it is gone from every tier.
            assert orch.ledger().tier_of("qwen-14b") is Tier.DISK
            assert not simulated(orch, "qwen-14b").is_loaded()
        stats = orch.statistics()
        assert (stats.switches, stats.evictions, stats.loads) == (2, 1, 2)
        assert device_of(orch).peak_owned_bytes <= BUDGET
        assert_settled(orch)


async def test_an_offload_and_an_unload_are_learned_as_two_costs(orch: Orchestrator) -> None:
    async with orch:
        async with orch.acquire("sdxl"):
            pass
        async with orch.acquire("llm"):  # sdxl-base offloaded to its host copy
            pass
        async with orch.acquire("sdxl"):  # qwen-14b (no host copy) unloaded
            pass
        measured = orch._ctx._measured
        assert measured["offload_s"] == {"sdxl-base"}
        assert measured["unload_s"] == {"qwen-14b"}
        # what the next switch is priced at: sdxl-base's offload, not an unload it never did
        sdxl = orch._ctx.costs["sdxl-base"]
        assert sdxl.offload_s < sdxl.unload_s


async def test_an_evicted_offloadable_model_comes_back_by_restore(orch: Orchestrator) -> None:
    async with orch:
        async with orch.acquire("sdxl"):
            pass
        async with orch.acquire("llm"):
            # sdxl-base (offload: true) was moved to the host tier, not dropped.
            assert orch.ledger().tier_of("sdxl-base") is Tier.HOST
            assert orch.ledger().host_used_bytes == gib_to_bytes(6.5)
            assert device_of(orch).held_by("sdxl-base") == 0
        async with orch.acquire("sdxl") as lease:
            assert isinstance(lease.handle, SimulatedModel)
            assert orch.ledger().tier_of("sdxl-base") is Tier.GPU
        stats = orch.statistics()
        assert stats.restores == 1
        assert stats.loads == 2  # sdxl-base once, qwen-14b once
        sdxl = simulated(orch, "sdxl-base")
        assert (sdxl.loads, sdxl.restores) == (1, 1)
        assert_settled(orch)


async def test_requests_waiting_during_a_switch_are_served_by_one_switch(orch: Orchestrator) -> None:
    granted: list[str] = []

    async def user() -> None:
        with anyio.fail_after(2):
            async with orch.acquire("sdxl") as lease:
                granted.append(lease.model)

    async with orch:
        async with orch.acquire("llm"):
            pass
        async with anyio.create_task_group() as tg:
            tg.start_soon(user)
            await wait_until(lambda: orch.state is State.SWITCHING, what="the switch to sdxl began")
            for _ in range(4):
                tg.start_soon(user)
            await wait_until(lambda: len(orch.waiting()) >= 4, what="four more sdxl waiters queued")
            assert orch.state is State.SWITCHING
        assert granted == ["sdxl-base"] * 5
        stats = orch.statistics()
        assert stats.switches == 2  # the LLM, then one switch for all five
        assert simulated(orch, "sdxl-base").loads == 1
        assert stats.grants == 6


# -- timeouts and cancellation -----------------------------------------------------------------


async def test_a_timeout_names_the_model_the_position_and_what_holds_the_gpu(orch: Orchestrator) -> None:
    release = anyio.Event()
    async with orch, anyio.create_task_group() as tg:
        await tg.start(hold, orch, "llm", release)
        with pytest.raises(AcquireTimeout) as info:
            async with orch.acquire("sdxl", timeout=0.1):
                pytest.fail("granted while the LLM lease is held")
        err = info.value
        assert isinstance(err, TimeoutError)
        assert (err.model, err.timeout_s, err.position, err.queued) == ("sdxl-base", 0.1, 1, 1)
        assert "qwen-14b (11.50 GiB)" in err.holding
        msg = str(err)
        assert "'sdxl-base'" in msg and "number 1 of 1" in msg and "qwen-14b" in msg
        assert orch.waiting() == []
        assert orch.statistics().timeouts == 1
        assert orch.state is State.LLM_ACTIVE
        assert orch.leases() == {"qwen-14b": 1}
        # The drain the waiter caused is over: the LLM takes new leases again.
        with anyio.fail_after(1):
            async with orch.acquire("llm"):
                assert orch.leases() == {"qwen-14b": 2}
        release.set()
    assert orch.statistics().switches == 1


async def test_a_timeout_reports_the_position_among_waiters_for_the_same_model(orch: Orchestrator) -> None:
    release = anyio.Event()
    errors: list[AcquireTimeout] = []

    async def waiter(limit_s: float) -> None:
        with pytest.raises(AcquireTimeout) as info:
            async with orch.acquire("sdxl", timeout=limit_s):
                pytest.fail("granted while the LLM lease is held")
        errors.append(info.value)

    async with orch, anyio.create_task_group() as tg:
        await tg.start(hold, orch, "llm", release)
        async with anyio.create_task_group() as waiters:
            waiters.start_soon(waiter, 0.3)
            await wait_until(lambda: len(orch.waiting()) == 1)
            waiters.start_soon(waiter, 0.05)
        release.set()
    assert [(e.position, e.queued) for e in errors] == [(2, 2), (1, 1)]
    assert orch.statistics().timeouts == 2


@pytest.mark.parametrize("after_s", [0.01, 0.15], ids=["before-the-drain", "while-draining"])
async def test_cancelling_a_waiter_leaves_the_queue_and_changes_nothing_else(
    orch: Orchestrator, after_s: float
) -> None:
    """A waiter cancelled by its caller should leave the queue and leave everything else as it was."""
    release = anyio.Event()
    events: list[Event] = []
    async with orch, anyio.create_task_group() as tg:
        await tg.start(hold, orch, "llm", release)
        before = orch.statistics()
        ledger = orch.ledger()
        orch.add_listener(events.append)
        with anyio.move_on_after(after_s) as scope:
            async with orch.acquire("sdxl"):
                pytest.fail("granted while the LLM lease is held")
        assert scope.cancelled_caught
        after = orch.statistics()
        assert orch.waiting() == []
        assert after.cancellations == before.cancellations + 1
        counters = ("switches", "failed_switches", "loads", "evictions", "grants", "releases", "timeouts")
        for counter in counters:
            assert getattr(after, counter) == getattr(before, counter), counter
        assert orch.state is State.LLM_ACTIVE
        assert orch.ledger().residents == ledger.residents
        assert orch.leases() == {"qwen-14b": 1}
        assert [(e.kind, e.model) for e in events] == [("cancel", "sdxl-base")]
        # Nothing drains any more: a new LLM lease is granted at once.
        with anyio.fail_after(1):
            async with orch.acquire("llm"):
                pass
        release.set()
    assert simulated(orch, "sdxl-base").loads == 0


async def test_cancelling_a_task_during_a_switch_leaves_a_consistent_state(orch: Orchestrator) -> None:
    """A task cancelled while its model loads (the load hangs) should leave the orchestrator
    in a consistent state: stable, matching the ledger, no memory left by the failed load,
    and the next acquire works."""
    async with orch:
        async with orch.acquire("llm"):
            pass
        sdxl = simulated(orch, "sdxl-base")
        sdxl.faults.hang_loads = 1
        device = device_of(orch)
        with anyio.move_on_after(2) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(hold, orch, "sdxl", anyio.Event())
                await wait_until(lambda: device.held_by("sdxl-base") > 0, what="the sdxl load began")
                assert orch.state is State.SWITCHING
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught
        assert orch.waiting() == []
        assert orch.statistics().cancellations == 1
        # The load hangs until load_timeout_s; then the executor cleans up.
        await wait_until(lambda: orch.state is not State.SWITCHING, within=3, what="the switch ended")
        assert_settled(orch)
        assert device.held_by("sdxl-base") == 0
        assert orch.state is State.IDLE  # the LLM was evicted before the load began
        assert orch.statistics().failed_switches == 1
        with anyio.fail_after(2):
            async with orch.acquire("sdxl") as lease:
                assert lease.model == "sdxl-base"
                assert orch.state is State.SDXL_ACTIVE
        assert_settled(orch)


# -- backend faults ----------------------------------------------------------------------------


async def test_a_load_that_raises_fails_its_waiter_and_a_retry_succeeds(orch: Orchestrator) -> None:
    events: list[Event] = []
    orch.add_listener(events.append)
    async with orch:
        async with orch.acquire("llm"):
            pass
        simulated(orch, "sdxl-base").faults.fail_loads = 1
        with anyio.fail_after(2), pytest.raises(LoadFailed) as info:
            async with orch.acquire("sdxl"):
                pytest.fail("granted a model whose load failed")
        err = info.value
        assert err.model == "sdxl-base"
        assert "'sdxl-base'" in str(err) and "injected load failure" in str(err)
        assert_settled(orch)
        assert device_of(orch).held_by("sdxl-base") == 0
        assert orch.statistics().failed_switches == 1
        assert orch.waiting() == []
        assert orch.last_errors()["sdxl-base"] is err  # the model records its error
        # The next request waits out retry_backoff_s, then loads.
        with anyio.fail_after(2):
            async with orch.acquire("sdxl") as lease:
                assert lease.model == "sdxl-base"
        assert_settled(orch)
        assert "sdxl-base" not in orch.last_errors()  # cleared by the success
    fail = next(e for e in events if e.kind == "fail")
    load = next(e for e in events if e.kind == "load" and e.model == "sdxl-base")
    assert load.time_s - fail.time_s >= orch.config.retry_backoff_s


async def test_a_load_that_hangs_past_load_timeout_fails_with_load_failed(make_orch: MakeOrch) -> None:
    orch = make_orch(load_timeout_s=0.05)
    async with orch:
        simulated(orch, "qwen-14b").faults.hang_loads = 1
        with anyio.fail_after(2), pytest.raises(LoadFailed, match=r"load_timeout_s=0\.05") as info:
            async with orch.acquire("llm"):
                pytest.fail("granted a model whose load hung")
        assert info.value.model == "qwen-14b"
        assert_settled(orch)
        assert orch.state is State.IDLE


async def test_foreign_memory_that_leaves_too_little_room_makes_the_request_wait(orch: Orchestrator) -> None:
    device = device_of(orch)
    granted = anyio.Event()

    async def user() -> None:
        async with orch.acquire("sdxl"):
            granted.set()

    async with orch:
        device.take_foreign(4242, gib_to_bytes(6))  # 15.5 - 6 = 9.5 GiB left; sdxl-base needs 10.5
        async with anyio.create_task_group() as tg:
            tg.start_soon(user)
            await wait_until(lambda: "sdxl-base" in orch.deferred(), what="the request deferred for the room")
            assert "other processes hold 6.00 GiB" in orch.deferred()["sdxl-base"]
            assert not granted.is_set()
            assert [m for m, _, _ in orch.waiting()] == ["sdxl-base"]
            assert orch.state is State.IDLE
            assert device.owned_bytes() == 0
            assert orch.ledger().foreign_bytes == gib_to_bytes(6)
            device.release_foreign(4242)
            with anyio.fail_after(2):
                await granted.wait()
        assert orch.statistics().failed_switches == 0
        assert device.peak_bytes <= device.total_bytes
        assert_settled(orch)


async def test_a_request_deferred_by_foreign_memory_times_out_naming_it(orch: Orchestrator) -> None:
    device_of(orch).take_foreign(4242, gib_to_bytes(6))
    async with orch:
        with pytest.raises(AcquireTimeout) as info:
            async with orch.acquire("sdxl", timeout=0.1):
                pytest.fail("granted although foreign memory leaves no room")
        assert "foreign processes 6.00 GiB" in info.value.holding
        assert orch.waiting() == []
        assert orch.state is State.IDLE
        # A model that fits in the room left is served meanwhile.
        with anyio.fail_after(1):
            async with orch.acquire("tts"):
                assert orch.state is State.TTS_ACTIVE


class IntrudedBackend(SimulatedBackend):
    """A backend whose next load first runs ``before_load`` (another process grabs memory)."""

    before_load: Callable[[], None] | None = None

    async def load(self, limit_bytes: int | None = None) -> Any:
        hook, self.before_load = self.before_load, None
        if hook is not None:
            hook()
        return await super().load(limit_bytes)


async def test_foreign_memory_taken_between_planning_and_loading(config: Config) -> None:
    device = SimulatedDevice(config.total_bytes)
    sdxl = IntrudedBackend(config.models["sdxl-base"], device, config.time_scale)
    sdxl.before_load = lambda: device.take_foreign(77, gib_to_bytes(6))
    orch = Orchestrator(config, device=device, backends={"sdxl-base": sdxl})
    outcome: list[object] = []

    async def user() -> None:
        try:
            with anyio.fail_after(2):
                async with orch.acquire("sdxl") as lease:
                    outcome.append(lease)
        except BackendOutOfMemory as exc:
            outcome.append(exc)

    async with orch:
        async with anyio.create_task_group() as tg:
            tg.start_soon(user)
            await wait_until(lambda: bool(outcome), what="the request's outcome")
            device.release_foreign(77)
        # The room was checked before the load; the foreign process took it during the load,
        # so the device refused the allocation: the request fails with BackendOutOfMemory
        # (nothing is ever allocated past the device), and the next one waits for the room.
        [result] = outcome
        assert isinstance(result, BackendOutOfMemory), result
        assert result.model == "sdxl-base"
        assert "out of memory" in str(result)
        assert device.held_by("sdxl-base") == 0 and not orch.ledger().on_gpu("sdxl-base")
        assert_settled(orch)
        with anyio.fail_after(2):
            async with orch.acquire("sdxl"):
                assert orch.state is State.SDXL_ACTIVE
        assert device.peak_owned_bytes <= orch.config.budget_bytes


async def test_an_unload_failure_keeps_the_evictee_accounted_for(orch: Orchestrator) -> None:
    async with orch:
        async with orch.acquire("llm"):
            pass
        qwen = simulated(orch, "qwen-14b")
        qwen.faults.fail_unloads = 2  # the eviction and the executor's second try both fail
        with anyio.fail_after(2), pytest.raises(UnloadFailed) as info:
            async with orch.acquire("sdxl"):
                pytest.fail("granted although the LLM could not be unloaded")
        err = info.value
        assert err.model == "qwen-14b"
        assert "'qwen-14b'" in str(err) and "sdxl-base" in str(err)
        # The LLM is still on the device, and the ledger still says so.
        assert orch.ledger().on_gpu("qwen-14b")
        assert device_of(orch).held_by("qwen-14b") == QWEN
        assert orch.state is State.LLM_ACTIVE
        assert_settled(orch)
        # It still serves, without a reload.
        with anyio.fail_after(1):
            async with orch.acquire("llm"):
                pass
        assert qwen.loads == 1
        # Once the fault is gone, the switch succeeds.
        with anyio.fail_after(2):
            async with orch.acquire("sdxl"):
                assert on_gpu(orch) == {"sdxl-base"}
        assert_settled(orch)


async def test_an_unload_that_fails_once_is_finished_by_the_cleanup(orch: Orchestrator) -> None:
    async with orch:
        async with orch.acquire("llm"):
            pass
        simulated(orch, "qwen-14b").faults.fail_unloads = 1
        with anyio.fail_after(2), pytest.raises(UnloadFailed) as info:
            async with orch.acquire("sdxl"):
                pytest.fail("granted although the eviction raised")
        assert info.value.model == "qwen-14b"
        # The executor's second unload worked: the ledger believes the backend.
        assert not orch.ledger().on_gpu("qwen-14b")
        assert device_of(orch).held_by("qwen-14b") == 0
        assert_settled(orch)
        assert orch.state is State.IDLE


async def test_a_slow_release_gives_vram_not_released_within_the_budget(make_orch: MakeOrch) -> None:
    orch = make_orch(unload_timeout_s=0.1)
    device = device_of(orch)
    async with orch:
        async with orch.acquire("llm"):
            pass
        # Freed 0.3 s after the unload returns (300 s at time scale 0.001); the deadline is 0.1 s.
        simulated(orch, "qwen-14b").faults.slow_release_s = 300
        device.reset_peaks()
        with anyio.fail_after(2), pytest.raises(VRAMNotReleased) as info:
            async with orch.acquire("sdxl"):
                pytest.fail("granted while the LLM's memory was still held")
        err = info.value
        assert err.model == "qwen-14b"
        assert "qwen-14b still holds 11.50 GiB" in str(err)
        assert orch.state is not State.SWITCHING
        assert orch.ledger().loading is None
        assert device.held_by("sdxl-base") == 0
        # The next request waits until the memory is really back, then loads.
        with anyio.fail_after(3):
            async with orch.acquire("sdxl"):
                assert device.held_by("qwen-14b") == 0
                assert orch.state is State.SDXL_ACTIVE
        assert device.peak_owned_bytes <= orch.config.budget_bytes
        assert device.peak_owned_bytes == QWEN
        assert_settled(orch)


# -- deadlocks and re-entrance -----------------------------------------------------------------


async def test_acquiring_sdxl_while_holding_the_llm_raises_lease_deadlock(orch: Orchestrator) -> None:
    async with orch:
        async with orch.acquire("llm"):
            with anyio.fail_after(2), pytest.raises(LeaseDeadlock) as info:
                async with orch.acquire("sdxl"):
                    pytest.fail("granted sdxl while this task holds the LLM")
            err = info.value
            assert (err.model, err.held) == ("sdxl-base", "qwen-14b")
            assert "acquire('qwen-14b')" in str(err)
            assert orch.waiting() == []
            assert orch.leases() == {"qwen-14b": 1}
            assert orch.state is State.LLM_ACTIVE
        # Outside the LLM lease the same request is served.
        with anyio.fail_after(2):
            async with orch.acquire("sdxl"):
                pass


async def test_an_owner_spans_tasks_for_deadlock_detection(orch: Orchestrator) -> None:
    """The daemon holds each remote lease in a task of its own; ``owner`` (one remote client
    task) ties them together, so the deadlock is seen across those tasks, and only there."""
    held = anyio.Event()
    done = anyio.Event()

    async def hold_llm(owner: object) -> None:
        async with orch.acquire("llm", owner=owner):
            held.set()
            await done.wait()

    async with orch:
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold_llm, "client-1")
            await held.wait()
            with anyio.fail_after(2), pytest.raises(LeaseDeadlock):
                async with orch.acquire("sdxl", owner="client-1"):
                    pytest.fail("granted sdxl while its owner holds the LLM")
            # another owner just waits (the LLM lease will end): no deadlock
            with anyio.move_on_after(0.2) as scope:
                async with orch.acquire("sdxl", owner="client-2"):
                    pytest.fail("granted sdxl while the LLM is held")
            assert scope.cancelled_caught
            done.set()
        assert orch.waiting() == []


async def test_a_light_model_held_while_acquiring_a_heavy_one_that_needs_its_room(orch: Orchestrator) -> None:
    # qwen-vl-7b (13.8 GiB) does not fit beside the TTS (3.5 GiB) in 15.5 GiB.
    async with orch:
        async with orch.acquire("tts"):
            with anyio.fail_after(2), pytest.raises(LeaseDeadlock) as info:
                async with orch.acquire("qwen-vl-7b"):
                    pytest.fail("granted qwen-vl-7b while this task holds the TTS")
            assert (info.value.model, info.value.held) == ("qwen-vl-7b", "gpt-sovits-small")


async def test_lease_deadlock_is_detected_when_another_model_is_the_target(orch: Orchestrator) -> None:
    """A task that holds the LLM and waits for sdxl gets LeaseDeadlock even while another
    model (qwen-vl-7b, queued earlier by another task) is the scheduler's target."""
    outcome: list[str] = []
    async with orch:
        async with anyio.create_task_group() as tg:
            async with orch.acquire("qwen-14b"):
                tg.start_soon(hold, orch, "qwen-vl-7b", anyio.Event())  # another task, queued first
                await wait_until(lambda: len(orch.waiting()) == 1)
                try:
                    with anyio.fail_after(0.5):
                        async with orch.acquire("sdxl"):
                            outcome.append("granted")
                except LeaseDeadlock:
                    outcome.append("LeaseDeadlock")
                except TimeoutError:
                    outcome.append("hung")
            tg.cancel_scope.cancel()
    assert outcome == ["LeaseDeadlock"]


async def test_a_reentrant_acquire_works_while_the_model_drains(orch: Orchestrator) -> None:
    order: list[str] = []
    nested_done = anyio.Event()
    go_nested = anyio.Event()

    async def owner(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with orch.acquire("llm"):
            task_status.started()
            await go_nested.wait()
            with anyio.fail_after(1):
                async with orch.acquire("llm") as again:
                    assert again.model == "qwen-14b"
                    assert orch.leases() == {"qwen-14b": 2}
                    order.append("nested llm")
            nested_done.set()
        order.append("llm released")

    async def image() -> None:
        with anyio.fail_after(3):
            async with orch.acquire("sdxl"):
                order.append("sdxl")

    async with orch:
        async with anyio.create_task_group() as tg:
            await tg.start(owner)
            tg.start_soon(image)
            # past fairness_s: the LLM drains
            await wait_until(
                lambda: any(
                    m == "sdxl-base" and waited > orch.config.fairness_s for m, _, waited in orch.waiting()
                ),
                what="the SDXL waiter past the fairness bound",
            )
            # Another task gets no new lease on the draining LLM...
            with pytest.raises(AcquireTimeout):
                async with orch.acquire("llm", timeout=0.05):
                    pytest.fail("a new lease on a draining model")
            # ...but the task that holds it does.
            go_nested.set()
            with anyio.fail_after(2):
                await nested_done.wait()
        assert order == ["nested llm", "llm released", "sdxl"]


# -- fairness and priority ---------------------------------------------------------------------


async def test_a_stream_of_llm_leases_does_not_starve_an_sdxl_waiter(orch: Orchestrator) -> None:
    stop = anyio.Event()
    llm_grants = 0
    waited: list[float] = []
    grants_while_waiting: list[int] = []

    async def chat(delay: float) -> None:
        nonlocal llm_grants
        await anyio.sleep(delay)
        while not stop.is_set():
            async with orch.acquire("llm"):
                llm_grants += 1
                await anyio.sleep(0.005)

    async def image() -> None:
        start = llm_grants
        with anyio.fail_after(2):
            async with orch.acquire("sdxl") as lease:
                waited.append(lease.waited_s)
                grants_while_waiting.append(llm_grants - start)
        stop.set()

    async with orch:
        async with orch.acquire("llm"):
            pass
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(chat, i * 0.002)
            await wait_until(lambda: orch.leases().get("qwen-14b", 0) >= 2, what="the LLM is busy")
            tg.start_soon(image)
    [w] = waited
    fairness = orch.config.fairness_s
    assert fairness * 0.99 <= w < fairness + 1.0  # busy for fairness_s, then served
    assert grants_while_waiting[0] >= 3  # the LLM did keep serving meanwhile


async def test_the_higher_priority_model_is_loaded_first(orch: Orchestrator) -> None:
    loads: list[str] = []
    orch.add_listener(lambda e: loads.append(e.model or "") if e.kind == "load" else None)
    release = anyio.Event()

    async def user(model: str, priority: int) -> None:
        with anyio.fail_after(3):
            async with orch.acquire(model, priority=priority):
                pass

    async with orch:
        async with anyio.create_task_group() as tg:
            await tg.start(hold, orch, "qwen-14b", release)
            tg.start_soon(user, "sdxl-base", 0)  # first to arrive
            await wait_until(lambda: len(orch.waiting()) == 1)
            tg.start_soon(user, "qwen-vl-7b", 5)
            await wait_until(lambda: len(orch.waiting()) == 2)
            release.set()
    assert loads == ["qwen-14b", "qwen-vl-7b", "sdxl-base"]


async def test_fcfs_mode_serves_in_arrival_order(make_orch: MakeOrch) -> None:
    orch = make_orch(scheduling="fcfs")
    loads: list[str] = []
    orch.add_listener(lambda e: loads.append(e.model or "") if e.kind == "load" else None)
    release = anyio.Event()

    async def user(model: str, priority: int) -> None:
        with anyio.fail_after(3):
            async with orch.acquire(model, priority=priority):
                pass

    async with orch:
        async with anyio.create_task_group() as tg:
            await tg.start(hold, orch, "qwen-14b", release)
            tg.start_soon(user, "sdxl-base", 0)
            await wait_until(lambda: len(orch.waiting()) == 1)
            tg.start_soon(user, "qwen-vl-7b", 5)
            await wait_until(lambda: len(orch.waiting()) == 2)
            release.set()
    assert loads == ["qwen-14b", "sdxl-base", "qwen-vl-7b"]


# -- shutdown ----------------------------------------------------------------------------------


async def test_leaving_async_with_unloads_everything(orch: Orchestrator) -> None:
    events: list[Event] = []
    orch.add_listener(events.append)
    async with orch:
        async with orch.acquire("llm"), orch.acquire("tts"):
            pass
        assert device_of(orch).used_bytes() == QWEN + TTS
    device = device_of(orch)
    assert device.used_bytes() == 0
    assert orch.state is State.IDLE
    assert orch.ledger().residents == ()
    assert not any(b.is_loaded() for b in orch.backends.values())
    transitions = [(e.trigger, e.from_state, e.to_state) for e in events if e.kind == "transition"]
    assert transitions[-2:] == [
        ("begin_switch", "LLM_ACTIVE", "SWITCHING"),
        ("finish_switch", "SWITCHING", "IDLE"),
    ]
    evicted = {e.model for e in events if e.kind == "evict"}
    assert evicted == {"qwen-14b", "gpt-sovits-small"}


async def test_host_copies_are_dropped_at_shutdown(orch: Orchestrator) -> None:
    async with orch:
        async with orch.acquire("sdxl"):
            pass
        async with orch.acquire("llm"):
            pass
        assert orch.ledger().tier_of("sdxl-base") is Tier.HOST
    assert orch.ledger().residents == ()
    assert simulated(orch, "sdxl-base").tier is Tier.DISK
    assert orch.state is State.IDLE


async def test_waiters_still_queued_at_exit_get_not_running(orch: Orchestrator) -> None:
    device = device_of(orch)
    errors: list[BaseException] = []

    async def user() -> None:
        try:
            async with orch.acquire("sdxl"):
                pytest.fail("granted although foreign memory leaves no room")
        except NotRunning as exc:
            errors.append(exc)

    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            async with orch:
                async with orch.acquire("tts"):
                    pass
                device.take_foreign(1, gib_to_bytes(6))  # sdxl-base can never fit while it is there
                tg.start_soon(user)
                tg.start_soon(user)
                await wait_until(lambda: len(orch.waiting()) == 2)
            assert orch.waiting() == []
    assert len(errors) == 2
    assert device.owned_bytes() == 0
    assert device.used_bytes() == gib_to_bytes(6)  # only the foreign process's memory is left
    assert orch.state is State.IDLE


async def test_leaving_during_a_hanging_load_cleans_up(orch: Orchestrator) -> None:
    """Leaving ``async with orch`` in the middle of a switch should cancel the switch, free
    what the load took, and end IDLE."""
    device = device_of(orch)
    errors: list[BaseException] = []

    async def user() -> None:
        try:
            async with orch.acquire("llm"):
                pytest.fail("granted a model whose load hangs")
        except NotRunning as exc:
            errors.append(exc)

    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            async with orch:
                simulated(orch, "qwen-14b").faults.hang_loads = 1
                tg.start_soon(user)
                await wait_until(lambda: device.held_by("qwen-14b") > 0, what="the load began")
                assert orch.state is State.SWITCHING
    assert len(errors) == 1
    assert device.used_bytes() == 0
    assert orch.state is State.IDLE
    assert orch.ledger().loading is None
    assert orch.ledger().residents == ()


async def test_the_orchestrator_can_run_again_after_it_closed(orch: Orchestrator) -> None:
    async with orch:
        async with orch.acquire("llm"):
            pass
    async with orch:
        async with orch.acquire("sdxl") as lease:
            assert lease.model == "sdxl-base"
    assert device_of(orch).used_bytes() == 0
    assert orch.state is State.IDLE


# -- statistics and events ---------------------------------------------------------------------


async def test_statistics_count_switches_grants_and_waits(orch: Orchestrator) -> None:
    async with orch:
        assert orch.statistics().state is State.IDLE
        for model in ("llm", "tts", "sdxl", "llm", "sdxl"):
            async with orch.acquire(model):
                assert orch.statistics().active_leases == {orch.resolve(model).name: 1}
        stats = orch.statistics()
    assert stats.state is State.SDXL_ACTIVE
    assert stats.switches == 5
    assert stats.failed_switches == 0
    assert (stats.loads, stats.restores) == (4, 1)  # qwen, tts, sdxl, qwen; sdxl restored
    assert stats.evictions == 3  # qwen (disk), sdxl (host), qwen (disk)
    assert (stats.grants, stats.releases) == (5, 5)
    assert (stats.timeouts, stats.cancellations) == (0, 0)
    assert stats.active_leases == {}
    assert stats.waiting == {}
    assert stats.waits.count == 5
    assert 0 <= stats.waits.p50_s <= stats.waits.p99_s <= stats.waits.max_s
    assert stats.waits.mean_s <= stats.waits.max_s
    assert stats.switching_s > 0
    assert stats.peak_committed_bytes == QWEN + TTS
    assert stats.peak_committed_bytes <= BUDGET


async def test_statistics_show_who_is_waiting(orch: Orchestrator) -> None:
    release = anyio.Event()
    async with orch, anyio.create_task_group() as tg:
        await tg.start(hold, orch, "llm", release)
        tg.start_soon(hold, orch, "sdxl", release)
        await wait_until(lambda: len(orch.waiting()) == 1)
        stats = orch.statistics()
        assert stats.waiting == {"sdxl-base": 1}
        assert stats.active_leases == {"qwen-14b": 1}
        [(model, priority, waited)] = orch.waiting()
        assert (model, priority) == ("sdxl-base", 0) and waited >= 0
        release.set()


async def test_every_transition_event_names_its_states_and_trigger(orch: Orchestrator) -> None:
    events: list[Event] = []
    orch.add_listener(events.append)
    async with orch:
        for model in ("llm", "tts", "sdxl", "llm"):
            async with orch.acquire(model):
                pass
    transitions = [e for e in events if e.kind == "transition"]
    names = {s.name for s in State}
    for e in transitions:
        assert e.trigger in ("begin_switch", "finish_switch", "fail_switch")
        assert e.from_state in names and e.to_state in names
        assert e.bytes_before is not None and e.bytes_after is not None
        assert e.to_dict()["trigger"] == e.trigger
    assert [(e.trigger, e.from_state, e.to_state) for e in transitions] == [
        ("begin_switch", "IDLE", "SWITCHING"),
        ("finish_switch", "SWITCHING", "LLM_ACTIVE"),
        ("begin_switch", "LLM_ACTIVE", "SWITCHING"),
        ("finish_switch", "SWITCHING", "LLM_ACTIVE"),  # the TTS rides along
        ("begin_switch", "LLM_ACTIVE", "SWITCHING"),
        ("finish_switch", "SWITCHING", "SDXL_ACTIVE"),
        ("begin_switch", "SDXL_ACTIVE", "SWITCHING"),
        ("finish_switch", "SWITCHING", "LLM_ACTIVE"),
        ("begin_switch", "LLM_ACTIVE", "SWITCHING"),  # shutdown
        ("finish_switch", "SWITCHING", "IDLE"),
    ]
    # Each switch's events come in order: transition, evictions, load, transition, grant.
    kinds = [(e.kind, e.model) for e in events if e.kind not in ("release", "learn")][:5]
    assert kinds == [
        ("transition", "qwen-14b"),
        ("load", "qwen-14b"),
        ("transition", "qwen-14b"),
        ("grant", "qwen-14b"),
        ("transition", "gpt-sovits-small"),
    ]
    assert all(b.time_s >= a.time_s for a, b in itertools.pairwise(events))


async def test_a_failed_switch_emits_fail_switch_and_fail(orch: Orchestrator) -> None:
    events: list[Event] = []
    orch.add_listener(events.append)
    async with orch:
        simulated(orch, "qwen-14b").faults.fail_loads = 1
        with pytest.raises(LoadFailed):
            async with orch.acquire("llm"):
                pass
    transitions = [(e.trigger, e.from_state, e.to_state) for e in events if e.kind == "transition"]
    assert transitions == [("begin_switch", "IDLE", "SWITCHING"), ("fail_switch", "SWITCHING", "IDLE")]
    [fail] = [e for e in events if e.kind == "fail"]
    assert fail.model == "qwen-14b" and "injected load failure" in (fail.detail or "")


async def test_a_listener_can_unsubscribe_and_a_failing_one_stays_subscribed(orch: Orchestrator) -> None:
    heard: list[str] = []
    failing_calls = 0

    def failing(event: Event) -> None:
        nonlocal failing_calls
        failing_calls += 1
        raise RuntimeError("listener bug")

    orch.add_listener(failing)
    unsubscribe = orch.add_listener(lambda e: heard.append(e.kind))
    async with orch:
        async with orch.acquire("llm"):
            pass
        n = len(heard)
        assert n > 0 and failing_calls == n
        unsubscribe()
        unsubscribe()  # twice is harmless
        async with orch.acquire("llm"):
            pass
    assert len(heard) == n
    assert failing_calls > n


async def test_the_event_iterator_sees_what_the_listeners_see(orch: Orchestrator) -> None:
    streamed: list[Event] = []
    heard: list[Event] = []

    async def consume() -> None:
        async with aclosing(orch.events()) as events:
            async for event in events:
                streamed.append(event)
                if event.kind == "transition" and event.to_state == "IDLE":
                    break

    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            async with orch:
                tg.start_soon(consume)
                await wait_until(lambda: orch.hub.subscribers == 1, what="the consumer subscribed")
                orch.add_listener(heard.append)
                async with orch.acquire("llm"):
                    pass
                async with orch.acquire("sdxl"):
                    pass
    assert streamed == heard
    assert [e.kind for e in streamed].count("grant") == 2
    assert streamed[-1].to_state == "IDLE"
    assert orch.hub.dropped == 0


async def test_the_history_keeps_the_events_heard_and_the_collector_does_not_track_them(
    orch: Orchestrator,
) -> None:
    heard: list[Event] = []
    orch.add_listener(heard.append)
    async with orch:
        async with orch.acquire("llm"):
            pass
        async with orch.acquire("sdxl"):
            pass
    assert orch.hub.history == heard  # every field of every event, in order
    assert {"grant", "release", "evict", "load"} <= {e.kind for e in heard}
    # A daemon keeps 10,000 of them: stored as tuples of strings and numbers, which the garbage
    # collector stops tracking once they have lived through a collection.
    gc.collect()
    assert not any(gc.is_tracked(record) for record in orch.hub._history)


async def test_the_event_iterator_drops_events_past_its_buffer(orch: Orchestrator) -> None:
    async with orch:
        async with aclosing(orch.events(buffer=2)) as events:
            async with orch.acquire("llm"):  # five events or more, nobody reading
                pass
            assert orch.hub.dropped > 0
            with anyio.fail_after(1):
                first = await events.__anext__()
                second = await events.__anext__()
            assert (first.kind, first.trigger, first.to_state) == ("transition", "begin_switch", "SWITCHING")
            assert second.kind == "load"


async def test_the_event_iterator_starts_when_it_is_created(orch: Orchestrator) -> None:
    """``orch.events()`` gives the events from the call on, not from the first read."""
    async with orch:
        events = orch.events()
        try:
            async with orch.acquire("llm"):
                pass
            with anyio.fail_after(0.3):
                first = await events.__anext__()
            assert (first.kind, first.trigger) == ("transition", "begin_switch")
        finally:
            await events.aclose()
