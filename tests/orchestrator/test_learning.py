"""The orchestrator measures: models larger than their estimate are learned, use peaks are
learned, learned footprints and times persist, foreign memory shrinks the room, and a resident
that holds more than planned is resized and evicted when idle."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator.backends.simulated import SimulatedBackend
from orchestrator.config import Config, parse_config
from orchestrator.device.simulated import SimulatedDevice, SimulatedOOM
from orchestrator.errors import AcquireTimeout, BackendOutOfMemory, InsufficientVRAM
from orchestrator.events import Event
from orchestrator.runtime import Orchestrator
from states.units import GIB, format_gib, gib_to_bytes
from tests.orchestrator.conftest import config_yaml, device_of, wait_until

pytestmark = pytest.mark.anyio

BUDGET = gib_to_bytes(15.5)

MODELS = """\
qwen-14b: {kind: llm, vram_gb: 11.5}
big: {kind: llm, vram_gb: 8.0, simulation: {true_vram_gb: 10.0}}
huge: {kind: llm, vram_gb: 8.0, simulation: {true_vram_gb: 15.0}}
vae: {kind: sdxl, vram_gb: 8.0, simulation: {use_peak_gb: 2.0}}
painter: {kind: sdxl, vram_gb: 8.0, simulation: {true_vram_gb: 6.0, use_peak_gb: 1.5}}
greedy: {kind: sdxl, vram_gb: 8.0, simulation: {true_vram_gb: 15.8}}
grower: {kind: sdxl, vram_gb: 8.0, simulation: {true_vram_gb: 10.0}}
mid: {kind: sdxl, vram_gb: 9.25}
gpt-sovits-small: {kind: tts, vram_gb: 3.5}
"""


def gib(x: float) -> int:
    return gib_to_bytes(x)


def margin(n: int, fraction: float = 0.05) -> int:
    return math.ceil(n * (1 + fraction))


def make_config(monitor: str = "", **switching: Any) -> Config:
    text = config_yaml(MODELS, None, **switching)
    if monitor:
        text += f"monitor: {monitor}\n"
    return parse_config(text, source="<learning test config>")


def record_events(orch: Orchestrator) -> list[Event]:
    events: list[Event] = []
    orch.add_listener(events.append)
    return events


def of(events: list[Event], kind: str, model: str | None = None) -> list[Event]:
    return [e for e in events if e.kind == kind and (model is None or e.model == model)]


async def use(orch: Orchestrator, model: str, timeout: float = 2.0) -> None:
    async with orch.acquire(model, timeout=timeout):
        pass


# -- a model larger than its estimate --------------------------------------------------------------


async def test_a_model_larger_than_its_estimate_fails_once_then_is_learned() -> None:
    orch = Orchestrator(make_config())
    events = record_events(orch)
    dev = device_of(orch)
    async with orch:
        assert orch.estimate("big").source == "config"
        with pytest.raises(BackendOutOfMemory) as info:
            await use(orch, "big")
        msg = str(info.value)
        assert info.value.model == "big"
        assert "'big'" in msg and "needs 10.00 GiB" in msg
        assert f"planned at {format_gib(margin(10 * GIB))}" in msg
        assert dev.held_by("big") == 0  # the failed load left nothing behind

        fp = orch.footprints.get("big")
        assert fp is not None and fp.high_water_bytes == 10 * GIB
        est = orch.estimate("big")
        assert est.source == "measured"
        assert est.estimated_vram_bytes == margin(10 * GIB)
        assert est.drift_bytes == 2 * GIB
        learned = of(events, "learn", "big")
        assert learned and "measured 10.00 GiB" in (learned[0].detail or "")

        async with orch.acquire("big", timeout=2) as lease:
            assert lease.handle is not None
            r = orch.ledger().get("big")
            assert r is not None and r.vram_bytes == margin(10 * GIB)
            assert dev.held_by("big") == 10 * GIB
        assert orch.backend("big").loads == 1  # type: ignore[attr-defined]
    assert dev.peak_owned_bytes <= BUDGET


async def test_a_model_learned_too_large_for_the_budget_is_refused_without_waiting() -> None:
    orch = Orchestrator(make_config())
    dev = device_of(orch)
    async with orch:
        with pytest.raises(BackendOutOfMemory, match=r"needs 15\.00 GiB"):
            await use(orch, "huge")
        assert orch.estimate("huge").estimated_vram_bytes == margin(15 * GIB) > BUDGET
        t0 = time.monotonic()
        with pytest.raises(InsufficientVRAM) as info:
            await use(orch, "huge", timeout=3)
        assert time.monotonic() - t0 < 1.0  # refused, not left to time out
        assert info.value.required_bytes == margin(15 * GIB)
        assert "'huge'" in str(info.value)
        assert orch.backend("huge").loads == 0  # type: ignore[attr-defined]
    assert dev.peak_owned_bytes <= BUDGET


async def test_the_device_never_passes_the_budget_while_estimates_are_learned() -> None:
    orch = Orchestrator(make_config())
    dev = device_of(orch)
    async with orch:
        for model in ["big", "qwen-14b", "big", "gpt-sovits-small", "big", "grower", "big"]:
            try:
                await use(orch, model)
            except BackendOutOfMemory:
                pass
            assert orch.ledger().committed_bytes <= BUDGET
        assert {"big", "grower"} <= set(orch.footprints.all())
    assert 0 < dev.peak_owned_bytes <= BUDGET
    assert dev.peak_bytes <= BUDGET


# -- use peaks ---------------------------------------------------------------------------------------


async def test_a_use_peak_within_the_limit_is_learned_after_the_lease() -> None:
    orch = Orchestrator(make_config())
    events = record_events(orch)
    async with orch:
        async with orch.acquire("painter", timeout=2) as lease:
            assert await lease.handle.run("a cat") == "[painter (simulated sdxl)] a cat"
            assert not [e for e in of(events, "learn", "painter") if (e.detail or "").startswith("peak")]
        peaks = [e for e in of(events, "learn", "painter") if (e.detail or "").startswith("peak")]
        assert len(peaks) == 1
        assert "measured 7.50 GiB" in (peaks[0].detail or "")
        assert peaks[0].bytes_after == gib(7.5)
        fp = orch.footprints.get("painter")
        assert fp is not None and (fp.load_bytes, fp.peak_bytes) == (6 * GIB, gib(7.5))
        assert orch.estimate("painter").source == "config"  # 7.5 < the configured 8
        async with orch.acquire("painter", timeout=2) as lease:
            await lease.handle.run("again")
        assert len(of(events, "learn", "painter")) == 2  # the load, the peak; nothing new


async def test_a_use_peak_past_the_limit_fails_that_use_and_is_learned() -> None:
    orch = Orchestrator(make_config())
    events = record_events(orch)
    dev = device_of(orch)
    async with orch:
        with pytest.raises(SimulatedOOM):
            async with orch.acquire("vae", timeout=2) as lease:
                await lease.handle.run("a cat")
        peaks = [e for e in of(events, "learn", "vae") if (e.detail or "").startswith("peak")]
        assert len(peaks) == 1 and "measured 10.00 GiB" in (peaks[0].detail or "")
        est = orch.estimate("vae")
        assert est.source == "measured" and est.estimated_vram_bytes == margin(10 * GIB)
        # Loaded again (after another model took its place), it has room for its peak.
        await use(orch, "qwen-14b")
        async with orch.acquire("vae", timeout=2) as lease:
            await lease.handle.run("a dog")
    assert dev.peak_owned_bytes <= BUDGET


async def test_the_next_lease_after_a_learned_use_peak_can_use_the_model() -> None:
    orch = Orchestrator(make_config())
    async with orch:
        with pytest.raises(SimulatedOOM):
            async with orch.acquire("vae", timeout=2) as lease:
                await lease.handle.run("a cat")
        assert orch.estimate("vae").estimated_vram_bytes == margin(10 * GIB) <= BUDGET
        async with orch.acquire("vae", timeout=2) as lease:
            await lease.handle.run("a dog")


# -- persistence ---------------------------------------------------------------------------------


async def test_learned_footprints_persist_and_a_new_orchestrator_plans_with_them(tmp_path: Path) -> None:
    path = tmp_path / "footprints.json"
    config = make_config(f"{{footprints_path: {json.dumps(str(path))}}}")
    first = Orchestrator(config)
    async with first:
        with pytest.raises(BackendOutOfMemory):
            await use(first, "big")
        await use(first, "big")
    saved = json.loads(path.read_text())["models"]["big"]
    assert saved["peak_bytes"] == 10 * GIB
    assert saved["load_bytes"] == 10 * GIB

    second = Orchestrator(config)
    events = record_events(second)
    assert second.estimate("big").source == "measured"
    assert second.estimate("big").estimated_vram_bytes == margin(10 * GIB)
    async with second:
        await use(second, "big")  # the first acquire succeeds: no out-of-memory to learn from
        assert second.backend("big").loads == 1  # type: ignore[attr-defined]
    assert not of(events, "fail")
    assert device_of(second).peak_owned_bytes <= BUDGET


async def test_a_restarted_orchestrator_starts_from_the_times_the_last_run_learned(tmp_path: Path) -> None:
    # The first run learns the LLM's load and unload, and how long a lease on it is held; the
    # store keeps them at time scale 1. A second run at twice the scale starts from them (its
    # seconds: twice as long) before it has loaded anything.
    path = tmp_path / "footprints.json"
    monitor = f"{{footprints_path: {json.dumps(str(path))}}}"
    first = Orchestrator(make_config(monitor))
    async with first:
        async with first.acquire("qwen-14b", timeout=2.0) as lease:
            await lease.handle.run("a turn", work_s=50.0)  # 50 ms at the test's time scale
        await use(first, "mid")  # the LLM is unloaded for it
        learned = first.costs()["qwen-14b"]
        held_s = first._book.hold_s["qwen-14b"]
    scale = 0.001  # the test config's time scale
    saved = json.loads(path.read_text())["times"]["qwen-14b"]
    assert saved["load_s"] == pytest.approx(learned.load_s / scale)
    assert saved["unload_s"] == pytest.approx(learned.unload_s / scale)
    assert saved["hold_s"] == pytest.approx(held_s / scale)
    assert held_s >= 0.05

    text = config_yaml(MODELS, None).replace(f"time_scale: {scale}", "time_scale: 0.002")
    second = Orchestrator(parse_config(text + f"monitor: {monitor}\n", source="<at time scale 0.002>"))
    assert second.costs()["qwen-14b"].load_s == pytest.approx(2 * learned.load_s)
    assert second.costs()["qwen-14b"].unload_s == pytest.approx(2 * learned.unload_s)
    assert second._book.hold_s["qwen-14b"] == pytest.approx(2 * held_s)
    # A model the first run never used starts from its configured latencies, as before.
    configured = Orchestrator(make_config()).costs()["vae"]
    assert second.costs()["vae"].load_s == pytest.approx(2 * configured.load_s)
    assert "vae" not in second._book.hold_s


async def test_a_footprint_learned_too_large_refuses_the_first_acquire(tmp_path: Path) -> None:
    path = tmp_path / "footprints.json"
    config = make_config(f"{{footprints_path: {json.dumps(str(path))}}}")
    first = Orchestrator(config)
    first.footprints.record("huge", 15 * GIB, kind="peak")
    orch = Orchestrator(config)
    async with orch:
        with pytest.raises(InsufficientVRAM):
            await use(orch, "huge")
        assert orch.backend("huge").loads == 0  # type: ignore[attr-defined]
        assert device_of(orch).peak_owned_bytes == 0


async def test_learn_footprints_false_keeps_the_configured_estimate(tmp_path: Path) -> None:
    path = tmp_path / "footprints.json"
    config = make_config(f"{{learn_footprints: false, footprints_path: {json.dumps(str(path))}}}")
    orch = Orchestrator(config)
    events = record_events(orch)
    async with orch:
        for _ in range(2):  # it learns nothing, so it fails again
            with pytest.raises(BackendOutOfMemory):
                await use(orch, "big")
        assert orch.footprints.get("big") is None
        est = orch.estimate("big")
        assert (est.source, est.estimated_vram_bytes) == ("config", 8 * GIB)
        await use(orch, "qwen-14b")
    assert not of(events, "learn")
    assert not path.exists()


# -- foreign memory ------------------------------------------------------------------------------


async def test_foreign_memory_makes_a_big_model_wait_and_the_timeout_names_the_pid() -> None:
    orch = Orchestrator(make_config())
    dev = device_of(orch)
    async with orch:
        dev.take_foreign(4242, 8 * GIB)
        with pytest.raises(AcquireTimeout) as info:
            await use(orch, "qwen-14b", timeout=0.2)
        msg = str(info.value)
        assert "pid 4242" in msg and "8.00 GiB" in msg
        assert orch.backend("qwen-14b").loads == 0  # type: ignore[attr-defined]
        await use(orch, "gpt-sovits-small")  # a small model still fits beside it


async def test_a_waiting_model_loads_once_the_foreign_process_leaves() -> None:
    orch = Orchestrator(make_config())
    dev = device_of(orch)
    async with orch:
        dev.take_foreign(4242, 8 * GIB)
        granted = anyio.Event()

        async def wait_for_it() -> None:
            await use(orch, "qwen-14b", timeout=3)
            granted.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for_it)
            await anyio.sleep(0.1)
            assert not granted.is_set()
            assert orch.waiting() and orch.waiting()[0][0] == "qwen-14b"
            dev.release_foreign(4242)
            with anyio.fail_after(2):
                await granted.wait()
    assert dev.peak_bytes <= 16 * GIB


async def test_foreign_memory_policy_fail_refuses_at_once_naming_the_pid() -> None:
    orch = Orchestrator(make_config(foreign_memory="fail"))
    dev = device_of(orch)
    async with orch:
        dev.take_foreign(4242, 8 * GIB)
        t0 = time.monotonic()
        with pytest.raises(InsufficientVRAM) as info:
            await use(orch, "qwen-14b", timeout=3)
        assert time.monotonic() - t0 < 1.0
        assert "pid 4242" in str(info.value)
        assert info.value.required_bytes == gib(11.5)
        assert orch.backend("qwen-14b").loads == 0  # type: ignore[attr-defined]


async def test_foreign_memory_growing_past_the_room_evicts_an_idle_resident() -> None:
    orch = Orchestrator(make_config())
    events = record_events(orch)
    dev = device_of(orch)
    async with orch:
        await use(orch, "qwen-14b")
        assert orch.ledger().on_gpu("qwen-14b")
        dev.take_foreign(4242, gib(4.2))  # 11.5 + 4.2 > the 15.5 budget
        await use(orch, "gpt-sovits-small")  # the next decision reads the device again
        evicted = [e for e in of(events, "evict", "qwen-14b") if "over the room" in (e.detail or "")]
        assert len(evicted) == 1
        ledger = orch.ledger()
        assert not ledger.on_gpu("qwen-14b")
        assert ledger.foreign_bytes == gib(4.2)
        assert ledger.fits()
        assert dev.held_by("qwen-14b") == 0


async def test_foreign_memory_growing_while_idle_is_noticed_without_another_acquire() -> None:
    orch = Orchestrator(make_config())
    events = record_events(orch)
    dev = device_of(orch)
    async with orch:
        await use(orch, "qwen-14b")
        dev.take_foreign(4242, gib(4.2))
        await wait_until(
            lambda: any(e.kind == "evict" and "over the room" in (e.detail or "") for e in events),
            within=1.0,
            what="the idle resident evicted",
        )
        assert orch.ledger().fits()


async def test_foreign_memory_does_not_evict_a_model_in_use() -> None:
    orch = Orchestrator(make_config())
    events = record_events(orch)
    dev = device_of(orch)
    async with orch:
        async with orch.acquire("qwen-14b", timeout=2) as lease:
            dev.take_foreign(4242, gib(4.2))
            with pytest.raises(AcquireTimeout):
                await use(orch, "gpt-sovits-small", timeout=0.1)
            assert orch.ledger().on_gpu("qwen-14b")
            assert lease.handle is not None
        await wait_until(lambda: not orch.ledger().on_gpu("qwen-14b"), what="evicted once released")
        assert [e for e in of(events, "evict", "qwen-14b") if "over the room" in (e.detail or "")]
        assert orch.ledger().fits()


# -- a resident that holds more than planned -----------------------------------------------------


class GreedyBackend(SimulatedBackend):
    """A backend that does not honour ``limit_bytes`` (a server that ignores its cap)."""

    async def load(self, limit_bytes: int | None = None) -> Any:
        return await super().load(None)


def with_greedy(config: Config, *names: str) -> Orchestrator:
    device = SimulatedDevice(config.total_bytes, name=config.gpu_name)
    backends = {n: GreedyBackend(config.models[n], device, config.time_scale) for n in names}
    return Orchestrator(config, device=device, backends=backends)


async def test_a_resident_larger_than_planned_is_resized_and_evicted_when_idle() -> None:
    orch = with_greedy(make_config(), "greedy")
    events = record_events(orch)
    dev = device_of(orch)
    async with orch:
        async with orch.acquire("greedy", timeout=2):
            await wait_until(lambda: bool(of(events, "resize", "greedy")), what="a resize event")
            resize = of(events, "resize", "greedy")[0]
            assert resize.bytes_after == gib(15.8)
            assert "holds 15.80 GiB, planned at 8.00 GiB" in (resize.detail or "")
            r = orch.ledger().get("greedy")
            assert r is not None and r.vram_bytes == gib(15.8)
            assert orch.ledger().on_gpu("greedy")  # in use: not evicted under the lease
        await wait_until(lambda: not orch.ledger().on_gpu("greedy"), what="greedy evicted once idle")
        evicted = of(events, "evict", "greedy")
        assert evicted and "over the room" in (evicted[0].detail or "")
        assert orch.ledger().fits()
        assert dev.held_by("greedy") == 0
        fp = orch.footprints.get("greedy")
        assert fp is not None and fp.high_water_bytes == gib(15.8)
        assert orch.estimate("greedy").estimated_vram_bytes > BUDGET  # never planned to fit again


async def test_a_resident_larger_than_planned_that_still_fits_stays() -> None:
    orch = with_greedy(make_config(), "grower")
    events = record_events(orch)
    async with orch:
        await use(orch, "grower")
        await wait_until(lambda: bool(of(events, "resize", "grower")), what="a resize event")
        await anyio.sleep(0.05)
        r = orch.ledger().get("grower")
        assert r is not None and r.vram_bytes == 10 * GIB
        assert orch.ledger().on_gpu("grower")
        assert not of(events, "evict", "grower")
        assert orch.estimate("grower").source == "measured"


# -- the device check right before a load --------------------------------------------------------


def foreign_arrives_during_eviction(orch: Orchestrator, evicted: str, pid: int, n_bytes: int) -> None:
    """When ``evicted`` leaves the GPU (between the plan and the load), a process takes memory."""
    dev = device_of(orch)

    def on_event(e: Event) -> None:
        if e.kind == "evict" and e.model == evicted and not dev.holders().get(f"foreign:{pid}"):
            dev.take_foreign(pid, n_bytes)

    orch.add_listener(on_event)


async def test_foreign_memory_that_appears_during_a_switch_stops_the_load() -> None:
    orch = Orchestrator(make_config())
    events = record_events(orch)
    dev = device_of(orch)
    foreign_arrives_during_eviction(orch, "qwen-14b", 4242, 8 * GIB)
    async with orch:
        await use(orch, "qwen-14b")
        granted = anyio.Event()

        async def want_mid() -> None:
            await use(orch, "mid", timeout=3)  # 9.25 GiB; the card has 8 free once qwen is gone
            granted.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(want_mid)
            await wait_until(lambda: bool(of(events, "fail", "mid")), what="the load refused")
            assert not granted.is_set()
            fail = of(events, "fail", "mid")[0]
            assert "pid 4242" in (fail.detail or "")
            assert orch.backend("mid").loads == 0  # type: ignore[attr-defined]
            dev.release_foreign(4242)
            with anyio.fail_after(2):
                await granted.wait()
        assert orch.backend("mid").loads == 1  # type: ignore[attr-defined]
        assert not [e for e in of(events, "fail") if "out of memory" in (e.detail or "")]


async def test_the_device_check_before_a_load_respects_the_budget() -> None:
    orch = Orchestrator(make_config())
    dev = device_of(orch)
    # 16 GiB card, 15.5 GiB budget: once qwen-14b is gone, 6.5 GiB foreign leaves 9.5 GiB free
    # on the card but only 9.0 GiB within the budget; mid needs 9.25.
    foreign_arrives_during_eviction(orch, "qwen-14b", 4242, gib(6.5))
    async with orch:
        await use(orch, "qwen-14b")
        with pytest.raises(AcquireTimeout, match="pid 4242"):
            await use(orch, "mid", timeout=0.3)
        assert orch.backend("mid").loads == 0  # type: ignore[attr-defined]
    assert dev.peak_bytes <= BUDGET
