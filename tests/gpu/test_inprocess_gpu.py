"""On a real GPU: the in-process backends with the packed, pinned host tier.

The tiny models on CUDA: load packs the weights into one pinned buffer; offload frees the
device copy (NVML shows it back) with no copy; restore is one copy; outputs are identical.
Run on a machine with CUDA: ``pytest tests/gpu -v -s``. The full-size figures come from
``python -m benchmarks.switch_gpu``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import Orchestrator, parse_config
from orchestrator.media import generate_image, synthesize_speech
from states.ledger import Tier

pytestmark = pytest.mark.anyio


def config(tiny: dict[str, Path]) -> str:
    return f"""
hardware: {{device: nvml, total_vram_gb: 16, safe_max_vram_gb: 15.5}}
switching: {{heavy_models: [llm, sdxl], light_models: [tts], host_ram_budget_gb: 4,
             load_timeout_s: 120, unload_timeout_s: 30}}
monitor: {{footprints_path: null}}
models:
  ballast: {{kind: llm, vram_gb: 12, backend: synthetic}}
  sdxl: {{kind: sdxl, vram_gb: 2, offload: true, host_gb: 0.5,
          backend: {{type: diffusers, path: "{tiny["tiny-sdxl"]}", steps: 2}}}}
  tts: {{kind: tts, vram_gb: 1, offload: true, host_gb: 0.1,
         backend: {{type: tts, path: "{tiny["tiny-tts"]}"}}}}
"""


async def test_pinned_tier_round_trip_on_cuda(tiny: dict[str, Path]) -> None:
    import torch

    async with Orchestrator(parse_config(config(tiny))) as orch:
        async with orch.acquire("sdxl") as lease:
            assert lease.handle.unet.device.type == "cuda"
            assert lease.handle.unet.dtype == torch.float16
            first = await generate_image(lease.handle, "a fox", seed=1)
        backend = orch.backend("sdxl")
        packed = backend._packed
        assert packed is not None and packed.pinned and packed.host.is_pinned()
        assert packed.shares_one_buffer() and packed.device_buffer.is_cuda
        held = backend.measured_bytes()
        assert held == packed.total_bytes

        reserved_before = torch.cuda.memory_reserved()
        async with orch.acquire("ballast"):  # 12 GiB of real tensors: SDXL goes to host RAM
            assert orch.ledger().get("sdxl").tier is Tier.HOST
            assert backend.measured_bytes() == 0
            assert torch.cuda.memory_reserved() < reserved_before + 12 * 2**30
        async with orch.acquire("sdxl") as lease:
            again = await generate_image(lease.handle, "a fox", seed=1)
        assert again == first
        assert (backend.loads, backend.restores) == (1, 1)
        t = {k: v * 1e3 for k, v in backend.timings.items()}
        print(
            f"\ntiny SDXL {packed.total_bytes / 2**20:.1f} MiB: offload {t['offload_s']:.2f} ms, "
            f"restore {t['restore_s']:.2f} ms (copy {t['restore_copy_s']:.2f} ms)"
        )
        async with orch.acquire("tts") as lease:
            wav = await synthesize_speech(lease.handle, "hello there", seed=0)
        assert wav[:4] == b"RIFF"
