"""The daemon on a machine with several cards: a remote lease names the card that serves it."""

from __future__ import annotations

import httpx
import pytest

from orchestrator import Orchestrator, parse_config
from orchestrator.daemon import Daemon, LeaseManager, create_app
from orchestrator.device.simulated import SimulatedDevice

pytestmark = pytest.mark.anyio

CONFIG = """
hardware: {device: simulated, gpus: [{index: 0, total_vram_gb: 24, safe_max_vram_gb: 23},
                                     {index: 1, total_vram_gb: 16, safe_max_vram_gb: 15}]}
simulation: {time_scale: 0.001}
monitor: {footprints_path: null}
models:
  qwen-14b: {kind: llm, vram_gb: 11.5}
  sdxl-base: {kind: sdxl, vram_gb: 10.5, gpus: [1]}
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_remote_leases_name_their_cards() -> None:
    config = parse_config(CONFIG, source="<test>")
    devices = {c.index: SimulatedDevice(c.total_bytes) for c in config.cards}
    async with Orchestrator(config, devices=devices) as orch, LeaseManager(orch, config.daemon) as leases:
        d = Daemon(orch, leases, config.daemon, None)
        transport = httpx.ASGITransport(app=create_app(d))
        async with httpx.AsyncClient(transport=transport, base_url="http://daemon", timeout=30) as client:
            llm = (await client.post("/v1/leases", json={"model": "qwen-14b", "ttl_s": 30})).json()
            sdxl = (await client.post("/v1/leases", json={"model": "sdxl-base", "ttl_s": 30})).json()
            assert llm["granted"] and sdxl["granted"]
            # two heavy models at once: one on each card, sdxl on the card its config allows
            assert sdxl["gpus"] == [1] and llm["gpus"] == [0]
            assert devices[0].held_by("qwen-14b") > 0 and devices[1].held_by("sdxl-base") > 0
            for lease in (llm, sdxl):
                assert (await client.delete(f"/v1/leases/{lease['id']}")).status_code in (200, 204)
        d.stopping.set()
        await d.upstreams.aclose()
