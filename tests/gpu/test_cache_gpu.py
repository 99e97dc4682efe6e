"""On a real GPU: a cold load from the packed disk cache goes straight to CUDA.

The tiny SDXL with a cache on the real device: the first load comes from the source and writes
the entry; after an unload, the next comes from the cache, its data file read in chunks and
each chunk copied to the device as it arrives (through a small pinned staging ring without a
host tier, into the pinned host copy with one). The weights on the GPU are byte-identical to
the source's, and so is the image. Run on a machine with CUDA: ``pytest tests/gpu -v -s``; the
full-size figures come from ``python -m benchmarks.cold_load SCRATCH --device cuda``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from orchestrator import Orchestrator, parse_config
from orchestrator.media import generate_image

pytestmark = pytest.mark.anyio


def config(tiny: dict[str, Path], cache: Path, *, offload: bool) -> str:
    host = "offload: true, host_gb: 0.5," if offload else "offload: false,"
    return f"""
hardware: {{device: nvml, total_vram_gb: 16, safe_max_vram_gb: 15.5}}
switching: {{host_ram_budget_gb: 4, load_timeout_s: 120, unload_timeout_s: 30}}
monitor: {{footprints_path: null}}
cache: {{path: "{cache}", budget_gb: 1}}
models:
  sdxl: {{kind: sdxl, vram_gb: 2, {host}
          backend: {{type: diffusers, path: "{tiny["tiny-sdxl"]}", steps: 2}}}}
"""


def weights_digest(modules: dict[str, Any]) -> str:
    """The bytes of every weight of every module, in order, hashed (read back from the GPU)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(modules):
        for pname, t in sorted(modules[name].state_dict().items()):
            h.update(f"{name}.{pname}".encode())
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("offload", [False, True], ids=["staging ring", "into the pinned host copy"])
async def test_a_cold_load_from_the_cache_lands_on_cuda_byte_identical(
    tiny: dict[str, Path], tmp_path: Path, offload: bool
) -> None:
    async with Orchestrator(parse_config(config(tiny, tmp_path / "cache", offload=offload))) as orch:
        backend = orch.backend("sdxl")
        async with orch.acquire("sdxl") as lease:
            assert backend.last_load_from == "source"
            first = await generate_image(lease.handle, "a fox", seed=1)
            source_digest = weights_digest(backend._modules)
        assert backend.cache_entry is not None and backend.cache_entry.state() == "fresh"

        await orch.unload("sdxl")
        async with orch.acquire("sdxl") as lease:
            assert backend.last_load_from == "cache"
            assert lease.handle.unet.device.type == "cuda"
            again = await generate_image(lease.handle, "a fox", seed=1)
            assert weights_digest(backend._modules) == source_digest
        assert again == first
        packed = backend._packed
        if offload:  # the host tier kept the pinned copy the chunks were read into
            assert packed is not None and packed.pinned and packed.host.is_pinned()
            assert packed.device_buffer.is_cuda
        t = {k: v * 1e3 for k, v in backend.timings.items()}
        print(f"\ntiny SDXL from the cache to CUDA ({'host copy' if offload else 'staging ring'}): {t}")
