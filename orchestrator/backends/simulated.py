"""Simulated backends: real timing and real (virtual) allocations, no model.

Latencies come from the config (defaults: the Model Management Module's switch targets) times
the config's time scale,
so tests run the same sequences in milliseconds. ``Faults`` injects failures: a load that
raises, an out-of-memory, a load that hangs, an unload that raises, a release that is slow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from orchestrator.backends.base import Backend, BackendType
from orchestrator.backends.options import parse_no_options
from orchestrator.device.base import Device
from orchestrator.device.simulated import SimulatedDevice, SimulatedOOM
from orchestrator.errors import ConfigError
from orchestrator.spec import Config, ModelSpec, SimSpec, card_share_bytes
from states.ledger import Tier


class SimulatedLoadError(RuntimeError):
    """The injected load failure."""


@dataclass
class Faults:
    """Failures to inject into the next operations. Counters count down as they fire."""

    fail_loads: int = 0  # the next N loads/restores raise SimulatedLoadError midway
    hang_loads: int = 0  # the next N loads/restores never finish (until cancelled)
    fail_unloads: int = 0  # the next N unloads/offloads raise before freeing anything
    slow_release_s: float = 0.0  # memory is freed this long after unload returns (scaled)


@dataclass
class SimulatedModel:
    """The handle of a simulated model: it "runs" for a scaled time and says what it did.

    While it runs it holds its use peak (``simulation.use_peak_gb``: SDXL's VAE decode) on top
    of its weights, within the limit it was loaded with, or fails with ``SimulatedOOM`` as
    torch would.
    """

    name: str
    kind: str
    time_scale: float
    backend: SimulatedBackend | None = None
    calls: int = 0

    async def run(self, prompt: str, work_s: float = 1.0) -> str:
        extra = self.backend.begin_use() if self.backend is not None else 0
        try:
            await anyio.sleep(work_s * self.time_scale)
        finally:
            if self.backend is not None:
                self.backend.end_use(extra)
        self.calls += 1
        return f"[{self.name} (simulated {self.kind})] {prompt}"


class SimulatedBackend(Backend):
    def __init__(self, spec: ModelSpec, device: SimulatedDevice, time_scale: float) -> None:
        super().__init__(spec.name, spec.kind, spec.vram_bytes)
        self.spec = spec
        self.sim: SimSpec = spec.sim or SimSpec(0, 0, 0, 0, spec.vram_bytes)
        self.device = device
        self.time_scale = time_scale
        self.faults = Faults()
        self.attempts = 0  # loads and restores begun (including those that failed)
        self.loads = 0
        self.restores = 0
        self.unloads = 0
        self.limit_bytes: int | None = None
        self._peak = 0  # the most it held, or wanted to, since loaded
        self._span: tuple[SimulatedDevice, ...] = ()  # the other cards a spanning model is on
        self._before: list[SimulatedDevice] = []  # cards it left memory on before a bind

    @property
    def supports_host_tier(self) -> bool:
        return self.spec.offload

    @property
    def host_copy_portable(self) -> bool:
        return True

    def bind(self, gpus: tuple[int, ...], devices: tuple[Device, ...]) -> None:
        # What a failed cleanup left on the cards it used before stays theirs until freed.
        for d in (self.device, *self._span):
            if d.held_by(self.owner, live_only=False) and all(d is not b for b in self._before):
                self._before.append(d)
        super().bind(gpus, devices)
        others = [d for d in devices[1:] if isinstance(d, SimulatedDevice)]
        self._span = tuple(others)  # a spanning model holds its share on each of these too

    def measured_bytes(self, *, live_only: bool = True) -> int | None:
        held = self.device.held_by(self.owner, live_only=live_only)
        if not live_only and self._before:
            # what it left on cards it used before, still on its way back (a slow release)
            self._before = [d for d in self._before if d.held_by(self.owner)]
            held += sum(d.held_by(self.owner) for d in self._before if d is not self.device)
        return held

    def peak_bytes(self) -> int | None:
        return self._peak or None

    def begin_use(self) -> int:
        """Take the use peak's extra bytes for the duration of one run (or fail as torch would)."""
        extra = self.sim.use_peak_bytes
        if not extra:
            return 0
        held = self.device.held_by(self.owner, live_only=True)
        self._peak = max(self._peak, held + extra)
        if self.limit_bytes is not None and held + extra > self.limit_bytes:
            raise SimulatedOOM(self.owner, held + extra, self.limit_bytes, limit=True)
        self.device.allocate(self.owner, extra)
        return extra

    def end_use(self, extra: int) -> None:
        if extra:
            self.device.shrink(self.owner, extra)

    async def _sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds * self.time_scale)

    async def _bring_in(self, seconds: float, limit_bytes: int | None) -> Any:
        # Allocate first, then spend the time: a load cancelled or failing midway leaves
        # memory behind, as a real one does, and the executor's cleanup must free it.
        need = self.sim.true_vram_bytes
        if self._span:
            need = card_share_bytes(need, 1 + len(self._span))  # on each card it spans
        self.attempts += 1
        self._peak = max(self._peak, need)
        if limit_bytes is not None and need > limit_bytes:
            raise SimulatedOOM(self.owner, need, limit_bytes, limit=True)
        self.limit_bytes = limit_bytes
        self.device.allocate(self.owner, need)
        for d in self._span:
            d.allocate(self.owner, need)
        self._tier = Tier.GPU
        self._handle = None
        if self.faults.hang_loads > 0:
            self.faults.hang_loads -= 1
            await anyio.sleep_forever()
        await self._sleep(seconds / 2)
        if self.faults.fail_loads > 0:
            self.faults.fail_loads -= 1
            raise SimulatedLoadError(f"injected load failure in {self.name!r}")
        await self._sleep(seconds / 2)
        self._handle = SimulatedModel(self.name, self.kind, self.time_scale, self)
        return self._handle

    async def load(self, limit_bytes: int | None = None) -> Any:
        if self._tier is Tier.GPU and self._handle is not None:
            return self._handle
        handle = await self._bring_in(self.sim.load_s, limit_bytes)
        self.loads += 1
        return handle

    async def restore(self, limit_bytes: int | None = None) -> Any:
        if self._tier is not Tier.HOST:
            return await self.load(limit_bytes)
        handle = await self._bring_in(self.sim.restore_s, limit_bytes)
        self.restores += 1
        return handle

    def _take_unload_fault(self) -> None:
        if self.faults.fail_unloads > 0:
            self.faults.fail_unloads -= 1
            raise RuntimeError(f"injected unload failure in {self.name!r}")

    async def unload(self) -> None:
        if self._tier is Tier.DISK and not self.device.held_by(self.owner):
            return
        self._take_unload_fault()
        if self._tier is Tier.GPU:
            await self._sleep(self.sim.unload_s)
        self._free()
        self._tier = Tier.DISK
        self.unloads += 1

    async def offload(self, tier: Tier) -> None:
        if tier is Tier.DISK or not self.supports_host_tier:
            await self.unload()
            return
        self._take_unload_fault()
        await self._sleep(self.sim.offload_s)
        self._free()
        self._tier = Tier.HOST

    def _free(self) -> None:
        self._handle = None
        self._peak = 0
        self.limit_bytes = None
        for d in {id(d): d for d in (self.device, *self._span, *self._before)}.values():
            d.free(self.owner, after_s=self.faults.slow_release_s * self.time_scale)


def create(spec: ModelSpec, *, config: Config, device: Device, log_dir: Path) -> SimulatedBackend:
    if isinstance(device, SimulatedDevice):
        return SimulatedBackend(spec, device, config.time_scale)
    raise ConfigError(
        config.source,
        f"models.{spec.name}.backend",
        f"a simulated backend cannot run on the real device ({device.source}: {device.name})",
        "set hardware.device: simulated to run the simulated models, or give the model a real "
        "backend (vllm, server, diffusers, tts)",
    )


BACKEND = BackendType(parse=parse_no_options, create=create)
