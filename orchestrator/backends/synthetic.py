"""A synthetic model: real CUDA memory of a given size, and nothing else.

It lets the orchestrator's own behaviour be checked on a real GPU (NVML peaks, release waits,
foreign processes) without model weights: ``backend: synthetic`` in a config allocates the
model's ``vram_gb`` (or ``simulation.true_vram_gb`` when set, to play an estimate that is
wrong) as CUDA tensors in this process. torch is imported only when one is loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio

from orchestrator.backends.base import Backend, BackendType
from orchestrator.backends.options import parse_no_options
from orchestrator.device.base import Device, DeviceOutOfMemory
from orchestrator.errors import ConfigError
from orchestrator.spec import Config, ModelSpec
from states.ledger import Tier

CHUNK_BYTES = 1 << 30  # allocate in 1 GiB tensors, as a real model's many tensors are


class SyntheticHandle:
    """What a lease on a synthetic model hands out: a way to use its memory. It holds no
    tensor itself, so a handle kept past its lease cannot keep the memory alive."""

    def __init__(self, backend: SyntheticBackend) -> None:
        self.name = backend.name
        self._backend = backend

    def run(self) -> int:
        """Write to every tensor (a real use of the memory); returns the bytes touched."""
        tensors = self._backend._tensors
        for t in tensors:
            t.fill_(1)
        return sum(int(t.numel()) for t in tensors)


class SyntheticBackend(Backend):
    def __init__(self, spec: ModelSpec, device_index: int = 0) -> None:
        super().__init__(spec.name, spec.kind, spec.vram_bytes)
        self.spec = spec
        self.device_index = device_index
        self.true_bytes = spec.sim.true_vram_bytes if spec.sim is not None else spec.vram_bytes
        self._tensors: list[Any] = []

    def bind(self, gpus: tuple[int, ...], devices: tuple[Device, ...]) -> None:
        super().bind(gpus, devices)
        self.device_index = gpus[0]

    def _torch(self) -> Any:
        try:
            import torch
        except ImportError:
            raise RuntimeError(
                "backend: synthetic needs torch: pip install 'vram-orchestrator[torch]'"
            ) from None
        return torch

    def measured_bytes(self, *, live_only: bool = True) -> int | None:
        return sum(int(t.numel()) for t in self._tensors)

    async def load(self, limit_bytes: int | None = None) -> Any:
        if self._tier is Tier.GPU:
            return self._handle
        torch = self._torch()
        if limit_bytes is not None and self.true_bytes > limit_bytes:
            raise DeviceOutOfMemory(self.name, self.true_bytes, limit_bytes, limit=True)

        def allocate() -> list[Any]:
            out, left = [], self.true_bytes
            while left > 0:
                n = min(CHUNK_BYTES, left)
                out.append(torch.empty(n, dtype=torch.uint8, device=f"cuda:{self.device_index}"))
                left -= n
            torch.cuda.synchronize(self.device_index)
            return out

        self._tensors = await anyio.to_thread.run_sync(allocate)
        self._tier = Tier.GPU
        self._handle = SyntheticHandle(self)
        return self._handle

    async def unload(self) -> None:
        if not self._tensors and self._tier is Tier.DISK:
            return
        self._handle = None
        self._tensors = []
        self._tier = Tier.DISK
        if "torch" in sys.modules:
            await anyio.to_thread.run_sync(sys.modules["torch"].cuda.empty_cache)


def create(spec: ModelSpec, *, config: Config, device: Device, log_dir: Path) -> SyntheticBackend:
    if device.source == "simulated":
        raise ConfigError(
            config.source,
            f"models.{spec.name}.backend",
            "a synthetic backend allocates real CUDA memory, but the device is simulated",
            "use backend: simulated, or hardware.device: auto on a machine with a GPU",
        )
    return SyntheticBackend(spec, int(getattr(device, "index", config.device_index)))


BACKEND = BackendType(parse=parse_no_options, create=create)
