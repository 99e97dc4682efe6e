"""The runtime on several cards: switches at once on two cards, a host copy restored onto
another card, a model kept to one card, a spanning model, a crash on one card, and a holder
of one card's model served on the other."""

from __future__ import annotations

import anyio
import pytest

from orchestrator import BackendCrashed, Orchestrator, parse_config
from orchestrator.device.simulated import SimulatedDevice
from orchestrator.events import Event
from states.machine import State
from states.units import GIB

from .conftest import wait_until

pytestmark = pytest.mark.anyio

TWO_CARDS = """
hardware: {device: simulated, gpus: [{index: 0, total_vram_gb: 24, safe_max_vram_gb: 23, gpu_name: big},
                                     {index: 1, total_vram_gb: 16, safe_max_vram_gb: 15, gpu_name: small}]}
simulation: {time_scale: 0.01}
switching: {host_ram_budget_gb: 16, max_wait_s: 60, retry_backoff_s: 0.5}
monitor: {footprints_path: null, sample_hz: 0}
models:
"""


def make(models: str) -> tuple[Orchestrator, dict[int, SimulatedDevice], list[Event]]:
    config = parse_config(TWO_CARDS + models, source="<test>")
    devices = {c.index: SimulatedDevice(c.total_bytes, name=c.name) for c in config.cards}
    orch = Orchestrator(config, devices=devices)
    events: list[Event] = []
    orch.add_listener(events.append)
    return orch, devices, events


async def test_two_heavy_models_are_served_at_once_and_switch_in_at_once() -> None:
    orch, devices, events = make(
        """
  llm: {kind: llm, vram_gb: 14, simulation: {load_s: 20}}
  sdxl: {kind: sdxl, vram_gb: 10, simulation: {load_s: 20}}
"""
    )
    both = anyio.Event()
    held: dict[str, int] = {}

    async def use(model: str) -> None:
        async with orch.acquire(model) as lease:
            assert lease.device is not None
            held[model] = lease.device.index
            if len(held) == 2:
                both.set()
            with anyio.fail_after(5):
                await both.wait()  # each holds its lease while the other is granted

    async with orch:
        async with anyio.create_task_group() as tg:
            tg.start_soon(use, "llm")
            tg.start_soon(use, "sdxl")
    assert set(held.values()) == {0, 1}
    # the two loads overlapped: each card began its switch before the other finished
    begins = {e.gpu: e.time_s for e in events if e.trigger == "begin_switch" and e.model in held}
    ends = {e.gpu: e.time_s for e in events if e.trigger == "finish_switch" and e.model in held}
    assert max(begins.values()) < min(ends.values())
    # every event names its card, and its bytes are that card's
    assert all(e.gpu in (0, 1) for e in events)
    assert all((e.committed_bytes or 0) <= (e.budget_bytes or 0) for e in events)
    assert all(d.peak_owned_bytes <= orch.cards().ledger(g).budget_bytes for g, d in devices.items())


async def test_a_host_copy_left_on_one_card_is_restored_onto_the_other() -> None:
    orch, devices, events = make(
        """
  big-llm: {kind: llm, vram_gb: 20, gpus: [0]}
  sdxl: {kind: sdxl, vram_gb: 10, offload: true, host_gb: 6}
  other: {kind: sdxl, vram_gb: 12, gpus: [1]}
"""
    )
    async with orch:
        async with orch.acquire("sdxl") as lease:
            first = lease.device
        assert first is not None and first.index == 0  # the larger, empty card
        async with orch.acquire("other"):  # card 1 busy meanwhile
            pass
        async with orch.acquire("big-llm"):  # only card 0: sdxl goes to the host tier
            assert orch.cards().tier_of("sdxl").value == "host"
            async with orch.acquire("sdxl") as lease:  # card 0 busy: restored onto card 1
                assert lease.device is not None and lease.device.index == 1
    restores = [e for e in events if e.kind == "load" and e.model == "sdxl" and e.detail == "from host"]
    assert [e.gpu for e in restores] == [1]
    assert devices[0].held_by("sdxl") == 0


async def test_a_model_kept_to_one_card_is_only_ever_there() -> None:
    orch, _, events = make(
        """
  llm: {kind: llm, vram_gb: 10}
  tts: {kind: tts, vram_gb: 3, gpus: [1]}
"""
    )
    async with orch:
        for _ in range(3):
            async with orch.acquire("tts") as lease:
                assert lease.device is not None and lease.device.index == 1
            async with orch.acquire("llm"):
                pass
    assert {e.gpu for e in events if e.kind == "load" and e.model == "tts"} == {1}


async def test_a_spanning_model_loads_and_leaves_both_cards_together() -> None:
    orch, devices, events = make(
        """
  big: {kind: llm, vram_gb: 26, tensor_parallel: 2}
  sdxl: {kind: sdxl, vram_gb: 10, gpus: [1]}
"""
    )
    share = 13 * GIB + 512 * 2**20
    async with orch:
        async with orch.acquire("big") as lease:
            assert [c.index for c in lease.devices] == [0, 1]
            cards = orch.cards()
            assert cards.gpus_of("big") == (0, 1)
            assert cards.ledger(0).committed_bytes == share == cards.ledger(1).committed_bytes
            assert devices[0].held_by("big") == devices[1].held_by("big") > 0
            assert orch.states() == {0: State.LLM_ACTIVE, 1: State.LLM_ACTIVE}
        async with orch.acquire("sdxl"):  # evicts it from card 1, and so from card 0 too
            cards = orch.cards()
            assert cards.gpus_of("big") == () and cards.ledger(0).committed_bytes == 0
            assert devices[0].held_by("big") == 0
            assert orch.states() == {0: State.IDLE, 1: State.SDXL_ACTIVE}
    loads = [e for e in events if e.kind == "load" and e.model == "big"]
    assert len(loads) == 1  # one joint load


async def test_a_crash_on_one_card_settles_that_card_only() -> None:
    orch, _, _ = make(
        """
  llm: {kind: llm, vram_gb: 14}
  sdxl: {kind: sdxl, vram_gb: 10}
"""
    )
    async with orch:
        crashed: list[str] = []
        async with anyio.create_task_group() as tg:
            release = anyio.Event()

            async def hold(model: str) -> None:
                try:
                    async with orch.acquire(model):
                        await release.wait()
                except BackendCrashed:
                    crashed.append(model)

            tg.start_soon(hold, "llm")
            tg.start_soon(hold, "sdxl")
            await wait_until(lambda: sum(orch.leases().values()) == 2)
            gpu_of_sdxl = orch.cards().gpus_of("sdxl")[0]
            orch._watch.crashed("sdxl", "killed")  # what the crash watcher does when a process dies
            assert orch.states()[gpu_of_sdxl] is State.IDLE
            assert orch.states()[1 - gpu_of_sdxl] is State.LLM_ACTIVE
            release.set()
        assert crashed == ["sdxl"]  # its lease ended with the crash; the LLM's did not


async def test_holding_one_cards_model_while_asking_for_another_heavy_one_is_no_deadlock() -> None:
    orch, _, _ = make(
        """
  llm: {kind: llm, vram_gb: 14}
  sdxl: {kind: sdxl, vram_gb: 10}
"""
    )
    async with orch:
        with anyio.fail_after(5):
            async with orch.acquire("llm") as a, orch.acquire("sdxl") as b:  # one task holds both
                assert a.device is not None and b.device is not None
                assert a.device.index != b.device.index
