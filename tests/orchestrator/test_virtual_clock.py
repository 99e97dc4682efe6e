"""The orchestrator on a virtual clock: every timing path of a simulated run reads the
orchestrator's clock, so a run of minutes of virtual time takes milliseconds and gives the
same figures every time.

Runs on anyio's trio backend with ``trio.testing.MockClock(autojump_threshold=0)``: when every
task waits, the clock jumps to the next deadline. The orchestrator's clock is the loop's
(``anyio.current_time``). A path left on ``time.monotonic`` (a slow release, the release
wait's deadline) would make the run spin through virtual time while real seconds pass.
"""

from __future__ import annotations

import functools
import random
import time
from typing import Any

import anyio
import anyio.abc
import pytest

from orchestrator.config import Config, parse_config
from orchestrator.device.simulated import SimulatedDevice
from orchestrator.errors import OrchestratorError
from orchestrator.footprints import FootprintStore
from orchestrator.monitor import wait_released
from orchestrator.runtime import Orchestrator

trio_testing = pytest.importorskip("trio.testing")

# The Model Management Module's card and models at time scale 1: latencies in real seconds (an LLM
# load 20 s, unload 6 s; SDXL load 6 s, unload 2.5 s), no host tier.
CONFIG = """\
hardware: {gpu_name: test GPU, device: simulated, total_vram_gb: 16.0, safe_max_vram_gb: 15.5}
simulation: {time_scale: 1.0}
switching:
  heavy_models: [llm, sdxl]
  light_models: [tts]
  scheduling: fair
  load_timeout_s: 120.0
  unload_timeout_s: 30.0
monitor: {footprints_path: null}
models:
  qwen-14b: {kind: llm, vram_gb: 11.5}
  sdxl-base: {kind: sdxl, vram_gb: 10.5}
  gpt-sovits-small: {kind: tts, vram_gb: 3.5}
defaults: {llm: qwen-14b, sdxl: sdxl-base, tts: gpt-sovits-small}
"""

SLOW_RELEASE_S = 10.0  # SDXL's memory comes back this long after its unload returns


def config() -> Config:
    return parse_config(CONFIG, source="<virtual clock test>")


def on_mock_clock(fn: Any, *args: Any) -> Any:
    """Run ``fn(*args)`` on trio with a fresh autojumping MockClock; trio's scheduler seeded."""
    from trio._core import _run

    _run._r.seed(0)
    clock = trio_testing.MockClock(autojump_threshold=0)
    return anyio.run(functools.partial(fn, *args), backend="trio", backend_options={"clock": clock})


async def workload(seed: int) -> dict[str, Any]:
    """Eight agents going between SDXL (whose memory is released slowly) and the LLM."""
    rng = random.Random(seed)
    plans = [
        [(rng.uniform(0, 5), rng.choice(["llm", "sdxl", "tts"]), rng.uniform(1, 8)) for _ in range(4)]
        for _ in range(8)
    ]
    waits: list[float] = []
    async with Orchestrator(config(), clock=anyio.current_time, footprints=FootprintStore(None)) as orch:
        orch.backends["sdxl-base"].faults.slow_release_s = SLOW_RELEASE_S  # type: ignore[attr-defined]

        async def agent(plan: list[tuple[float, str, float]]) -> None:
            for think_s, model, work_s in plan:
                await anyio.sleep(think_s)
                async with orch.acquire(model) as lease:
                    waits.append(lease.waited_s)
                    await lease.handle.run("step", work_s=work_s)

        async with anyio.create_task_group() as tg:
            for plan in plans:
                tg.start_soon(agent, plan)
        end_s = orch.now_s()
        stats = orch.statistics()
        events = [(e.time_s, e.kind, e.model, e.trigger, e.detail) for e in orch.hub.history]
    return {
        "end_s": end_s,
        "waits": waits,
        "switches": stats.switches,
        "switching_s": stats.switching_s,
        "events": events,
    }


def test_a_virtual_run_takes_no_real_time_and_repeats_exactly() -> None:
    t0 = time.perf_counter()
    first = on_mock_clock(workload, 7)
    real_s = time.perf_counter() - t0
    second = on_mock_clock(workload, 7)
    assert first == second  # bit for bit: times, waits, every event
    assert first["switches"] >= 4
    # SDXL left the GPU at least once, each time its memory back only SLOW_RELEASE_S later
    sdxl_out = [e for e in first["events"] if e[1] == "evict" and e[2] == "sdxl-base"]
    assert sdxl_out
    assert first["end_s"] > 100.0  # minutes of virtual time (loads of 20 s, releases of 10 s)
    assert real_s < first["end_s"] / 20, (real_s, first["end_s"])


async def evict_slow_sdxl(slow_s: float) -> tuple[float, float | None, str]:
    """SDXL, then the LLM: SDXL is unloaded (2.5 s), its memory back ``slow_s`` later, then
    the LLM loads (20 s). Returns the LLM's wait, the switch's duration and what failed."""
    async with Orchestrator(config(), clock=anyio.current_time, footprints=FootprintStore(None)) as orch:
        orch.backends["sdxl-base"].faults.slow_release_s = slow_s  # type: ignore[attr-defined]
        async with orch.acquire("sdxl"):
            pass
        t0 = orch.now_s()
        try:
            async with orch.acquire("llm", timeout=200.0) as lease:
                return lease.waited_s, orch.now_s() - t0, ""
        except OrchestratorError as exc:
            return orch.now_s() - t0, None, f"{type(exc).__name__}: {exc}"


def test_the_release_wait_and_the_slow_release_run_on_the_orchestrators_clock() -> None:
    t0 = time.perf_counter()
    waited_s, took_s, failed = on_mock_clock(evict_slow_sdxl, SLOW_RELEASE_S)
    assert failed == ""
    # unload 2.5 s + release 10 s + load 20 s, to within the release wait's polling (2 ms)
    assert 32.5 <= waited_s <= 32.5 + 0.01, waited_s
    assert took_s == pytest.approx(waited_s)
    assert time.perf_counter() - t0 < 5.0


def test_a_release_slower_than_unload_timeout_fails_after_it_in_virtual_time() -> None:
    t0 = time.perf_counter()
    elapsed_s, took_s, failed = on_mock_clock(evict_slow_sdxl, 100.0)  # unload_timeout_s is 30
    assert took_s is None
    assert "VRAMNotReleased" in failed and "still holds" in failed, failed
    # the unload (2.5 s), then the release wait's 30 s deadline on the virtual clock
    assert 32.5 <= elapsed_s <= 32.5 + 0.01, elapsed_s
    assert time.perf_counter() - t0 < 5.0


def test_the_simulated_device_releases_on_its_clock() -> None:
    now = [100.0]
    device = SimulatedDevice(16 * 2**30, clock=lambda: now[0])
    device.allocate("sdxl", 2**30)
    device.free("sdxl", after_s=5.0)
    assert device.held_by("sdxl") == 2**30 and device.held_by("sdxl", live_only=True) == 0
    now[0] += 4.999
    assert device.used_bytes() == 2**30
    now[0] += 0.002
    assert device.used_bytes() == 0 and device.holders() == {}


def test_an_orchestrator_gives_the_device_it_builds_its_clock() -> None:
    def clock() -> float:
        return 42.0

    orch = Orchestrator(config(), clock=clock, footprints=FootprintStore(None))
    assert isinstance(orch.device, SimulatedDevice) and orch.device.clock is clock
    assert orch.monitor.get_snapshot().time_s == 42.0
    # a device given to it keeps its own clock
    mine = SimulatedDevice(16 * 2**30)
    Orchestrator(config(), device=mine, clock=clock, footprints=FootprintStore(None))
    assert mine.clock is not clock


def test_wait_released_times_out_on_the_given_clock() -> None:
    async def main() -> tuple[float, str]:
        t0 = anyio.current_time()
        try:
            await wait_released(lambda: [("m", 1)], timeout_s=7.0, poll_s=0.5, clock=anyio.current_time)
        except OrchestratorError as exc:
            return anyio.current_time() - t0, str(exc)
        return anyio.current_time() - t0, ""

    t0 = time.perf_counter()
    elapsed_s, message = on_mock_clock(main)
    assert elapsed_s == 7.0 and "m still holds" in message and "7 s after unloading" in message
    assert time.perf_counter() - t0 < 2.0


async def artist_and_chat(same_artist: bool) -> list[str]:
    """Three SDXL images 0.3 s apart, by one task (``same_artist``) or by three tasks one
    after another; a chat request for the LLM comes as the second image ends. Returns the
    order in which the four requests were served."""
    served: list[str] = []
    async with Orchestrator(config(), clock=anyio.current_time, footprints=FootprintStore(None)) as orch:
        second_done, all_done = anyio.Event(), anyio.Event()

        async def draw(i: int) -> None:
            async with orch.acquire("sdxl"):
                served.append(f"image {i}")
                await anyio.sleep(1.0)
            if i == 1:
                second_done.set()

        async def one_user(i: int, drawn: anyio.Event) -> None:
            await draw(i)
            drawn.set()
            await all_done.wait()  # alive to the end: Python may give a new task an ended one's id

        async def artist(tg: anyio.abc.TaskGroup) -> None:
            for i in range(3):
                if same_artist:
                    await draw(i)
                else:  # a task of its own: a new user
                    drawn = anyio.Event()
                    tg.start_soon(one_user, i, drawn)
                    await drawn.wait()
                await anyio.sleep(0.3)
            all_done.set()

        async def chat() -> None:
            await second_done.wait()
            async with orch.acquire("llm"):
                served.append("chat")

        async with anyio.create_task_group() as tg:
            tg.start_soon(artist, tg)
            tg.start_soon(chat)
    return served


def test_an_idle_model_waits_a_moment_for_a_user_who_comes_back() -> None:
    # The artist who drew twice comes back 0.3 s after its second image, within the grace
    # (an eighth of the switch's cost): SDXL draws its third image before the switch.
    assert on_mock_clock(artist_and_chat, True) == ["image 0", "image 1", "image 2", "chat"]
    # Three requests, each its own user, as API calls are: nobody to wait for, the switch
    # goes as the second image ends, and the third image waits for the switch back.
    assert on_mock_clock(artist_and_chat, False) == ["image 0", "image 1", "chat", "image 2"]


async def images_behind_a_busy_llm(learned: bool, sdxl_load_s: float = 1.0) -> float:
    """Sixteen SDXL images asked for at once (SDXL draws one at a time, 8 s each) while a chat
    user keeps the LLM busy (one turn after another); how long after the images were asked for
    the switch began. With ``learned``, one image was drawn before, so the orchestrator knows
    how long an SDXL lease lasts; without, it knows only how long SDXL takes to load."""
    text = CONFIG.replace("scheduling: fair", "scheduling: fair\n  max_wait_s: 120.0").replace(
        "sdxl-base: {kind: sdxl, vram_gb: 10.5}",
        f"sdxl-base: {{kind: sdxl, vram_gb: 10.5, max_concurrent: 1, simulation: {{load_s: {sdxl_load_s}}}}}",
    )
    cfg = parse_config(text, source="<virtual clock test>")
    async with Orchestrator(cfg, clock=anyio.current_time, footprints=FootprintStore(None)) as orch:
        if learned:
            async with orch.acquire("sdxl") as lease:
                await lease.handle.run("image", work_s=8.0)
        chatting, done = anyio.Event(), anyio.Event()

        async def chat() -> None:
            while not done.is_set():
                async with orch.acquire("llm") as lease:
                    chatting.set()
                    await lease.handle.run("turn", work_s=2.0)

        async def image() -> None:
            async with orch.acquire("sdxl") as lease:
                await lease.handle.run("image", work_s=8.0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(chat)
            await chatting.wait()
            asked_s = orch.now_s()
            async with anyio.create_task_group() as images:
                for _ in range(16):
                    images.start_soon(image)
            done.set()
        starts = [
            e.time_s
            for e in orch.hub.history
            if e.kind == "transition" and e.trigger == "begin_switch" and e.time_s > asked_s
        ]
    return starts[0] - asked_s


def test_a_queue_for_a_model_that_serves_one_at_a_time_is_counted_in_turns() -> None:
    # No SDXL lease has ended: a turn is taken to last as long as SDXL's load, 1 s here. The
    # sixteenth image would begin 15 s after the switch, so the floor (0.6 x max_wait_s =
    # 72 s, counted to that lease) comes at 57 s; the chat turn in progress ends within 2 s.
    # (The price, 16 x the switch's 7 s for each of the two users it holds up, is paid by the
    # sixteen waiters in 14 s.)
    assert 57.0 <= on_mock_clock(images_behind_a_busy_llm, False) < 60.0
    # Known (8 s): the tenth image would begin 72 s after the switch, so the queue's floor
    # has come at once and the price decides.
    assert on_mock_clock(images_behind_a_busy_llm, True) < 15.0
