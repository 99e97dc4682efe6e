"""The in-process backends on two simulated cards: the tiny SDXL standing in on the card it is
placed on, and its host copy restored onto the other card."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from orchestrator import Orchestrator, parse_config
from orchestrator.device.simulated import SimulatedDevice
from tests.orchestrator.conftest import wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_the_tiny_sdxl_takes_its_bytes_on_its_own_card_and_comes_back_on_the_other(
    tiny: dict[str, Path],
) -> None:
    config = parse_config(
        f"""
hardware: {{device: simulated, gpus: [{{index: 0, total_vram_gb: 16, safe_max_vram_gb: 15.5}},
                                     {{index: 1, total_vram_gb: 16, safe_max_vram_gb: 15.5}}]}}
switching: {{host_ram_budget_gb: 12, load_timeout_s: 60}}
simulation: {{time_scale: 0.001}}
monitor: {{footprints_path: null, sample_hz: 0}}
models:
  qwen-14b: {{kind: llm, vram_gb: 11.5, gpus: [0]}}
  big-llm: {{kind: llm, vram_gb: 13, gpus: [1]}}
  sdxl-base:
    kind: sdxl
    vram_gb: 10.5
    offload: true
    host_gb: 6.5
    backend: {{type: diffusers, path: "{tiny["tiny-sdxl"]}", steps: 2}}
""",
        source="<test>",
    )
    devices = {c.index: SimulatedDevice(c.total_bytes) for c in config.cards}
    async with Orchestrator(config, devices=devices) as orch:
        with anyio.fail_after(120):
            release = anyio.Event()
            async with anyio.create_task_group() as tg:

                async def hold(model: str) -> None:
                    async with orch.acquire(model):
                        await release.wait()

                tg.start_soon(hold, "qwen-14b")  # card 0 busy with the LLM
                await wait_until(lambda: bool(orch.leases().get("qwen-14b")), within=60, what="its grant")
                async with orch.acquire("sdxl-base") as lease:
                    assert lease.device is not None and lease.device.index == 1
                    assert devices[1].held_by("sdxl-base") > 0 and devices[0].held_by("sdxl-base") == 0
                release.set()
            async with orch.acquire("big-llm"):  # card 1 only: SDXL goes to the host tier
                assert orch.cards().tier_of("sdxl-base").value == "host"
                async with orch.acquire("sdxl-base") as lease:  # restored onto card 0
                    assert lease.device is not None and lease.device.index == 0
                    assert devices[0].held_by("sdxl-base") > 0 and devices[1].held_by("sdxl-base") == 0
                    image = lease.handle("a lighthouse", num_inference_steps=1).images[0]
                    assert image.size[0] > 0
