"""``VRAMMonitor``: the Model Management Module's VRAM API, on real readings.

It reads one ``Device`` (NVML when a driver answers, torch's CUDA view otherwise, the
simulated device when the config asks for it or there is no GPU) and knows each model's
estimate: the configured figure, or the learned footprint when a measurement says more.
``PeakSampler`` records a timeline of the device's use and the peak between two marks.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import anyio

from orchestrator.config import Config, ModelSpec, load_config
from orchestrator.device import Device, DeviceReading, SimulatedDevice, open_device
from orchestrator.device.torchmem import AllocatorStats, TorchDevice
from orchestrator.errors import UnknownModel
from orchestrator.footprints import FootprintStore, default_path
from states.errors import InsufficientVRAM
from states.units import GIB, format_gib


@dataclass(frozen=True)
class VRAMSnapshot:
    """One reading. Bytes inside; ``*_gb`` properties (GiB) for the module's users."""

    source: str
    device_name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    budget_bytes: int
    process_bytes: int | None  # what this process holds per NVML (None: not listed)
    allocated_bytes: int | None  # this process's torch allocator (None: no torch on CUDA)
    reserved_bytes: int | None
    foreign: tuple[tuple[int, int], ...]  # (pid, bytes) of other processes on the device
    time_s: float = field(default_factory=time.monotonic)

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GIB

    @property
    def used_gb(self) -> float:
        return self.used_bytes / GIB

    @property
    def free_gb(self) -> float:
        return self.free_bytes / GIB

    @property
    def allocated_gb(self) -> float:
        """This process's allocated bytes (torch), or the device's used bytes when torch cannot say."""
        return (self.allocated_bytes if self.allocated_bytes is not None else self.used_bytes) / GIB

    @property
    def reserved_gb(self) -> float:
        return (self.reserved_bytes if self.reserved_bytes is not None else self.used_bytes) / GIB

    @property
    def foreign_bytes(self) -> int:
        return sum(n for _, n in self.foreign)

    @property
    def budget_free_bytes(self) -> int:
        """Room within the budget: the budget less everything in use, never more than is free."""
        return max(0, min(self.free_bytes, self.budget_bytes - self.used_bytes))


@dataclass(frozen=True)
class ModelEstimate:
    name: str
    kind: str
    estimated_vram_bytes: int  # what the orchestrator plans with
    configured_bytes: int
    learned_bytes: int | None  # the learned high-water mark, if measured
    confidence: str
    source: str  # "config" or "measured"

    @property
    def estimated_vram_gb(self) -> float:
        return self.estimated_vram_bytes / GIB

    @property
    def drift_bytes(self) -> int | None:
        """Measured minus configured (positive: the config underestimates)."""
        return None if self.learned_bytes is None else self.learned_bytes - self.configured_bytes


def foreign_processes(reading: DeviceReading) -> tuple[tuple[int, int], ...]:
    """(pid, bytes) of the processes other than this one that hold memory on the device."""
    me = os.getpid()
    return tuple((p.pid, p.used_bytes) for p in reading.processes or () if p.pid != me and p.used_bytes)


def describe_processes(procs: Iterable[tuple[int, int]]) -> str:
    """``pid 4242 holds 4.00 GiB, pid 77 holds 0.50 GiB`` for messages."""
    return ", ".join(f"pid {pid} holds {format_gib(n)}" for pid, n in procs)


def planning_estimate(spec: ModelSpec, store: FootprintStore | None, config: Config) -> ModelEstimate:
    """The estimate to plan with: the configured figure, or, when a measurement found the model
    larger (and learning is on), the learned high-water mark plus the margin."""
    fp = store.get(spec.name) if store is not None else None
    learned = fp.high_water_bytes if fp is not None else None
    estimate, source = spec.vram_bytes, "config"
    # The margin covers what one measurement may have missed once the config is known to be
    # low; a measurement at or under the configured figure leaves the configured figure.
    if learned is not None and config.learn_footprints and learned > spec.vram_bytes:
        estimate, source = math.ceil(learned * (1 + config.footprint_margin)), "measured"
    return ModelEstimate(spec.name, spec.kind, estimate, spec.vram_bytes, learned, spec.confidence, source)


def open_store(config: Config) -> FootprintStore:
    path = config.footprints_path
    return FootprintStore(default_path() if path == "default" else path)


class VRAMMonitor:
    """VRAM readings and per-model estimates (the Model Management Module's ``VRAMMonitor``).

    :param device: a GPU index, or a ``Device`` to read (the orchestrator passes its own).
    :param config: a config path or ``Config``; ``None`` is the embedded default (whose
        estimates are the Model Management Module's). With a GPU index, the device is chosen as
        ``auto`` unless the config names one other than ``simulated``: NVML when a driver
        answers, torch's view otherwise, the simulated device only without a GPU (said once).
    :param footprints: the learned-footprint store (default: the config's).
    :param clock: what stamps a snapshot's ``time_s`` (the orchestrator passes its own).
    """

    def __init__(
        self,
        device: int | Device = 0,
        config: str | Path | Config | None = None,
        *,
        footprints: FootprintStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.config = config if isinstance(config, Config) else load_config(config)
        if isinstance(device, int):
            kind = self.config.device if self.config.device not in ("simulated",) else "auto"
            self.device: Device = open_device(
                kind, device, total_bytes=self.config.total_bytes, name=self.config.gpu_name
            )
        else:
            self.device = device
        self.footprints = footprints if footprints is not None else open_store(self.config)
        self._torch: TorchDevice | None = None
        if self.device.source in ("nvml", "torch") and "torch" in sys.modules:
            try:
                self._torch = TorchDevice(getattr(self.device, "index", 0))
            except Exception:
                self._torch = None

    @property
    def source(self) -> str:
        return self.device.source

    # -- readings ----------------------------------------------------------------------------

    def get_snapshot(self) -> VRAMSnapshot:
        reading: DeviceReading = self.device.read()
        me = os.getpid()
        own = next((p.used_bytes for p in reading.processes or () if p.pid == me), None)
        alloc: AllocatorStats | None = self._torch.allocator() if self._torch is not None else None
        return VRAMSnapshot(
            source=reading.source,
            device_name=self.device.name,
            total_bytes=reading.total_bytes,
            used_bytes=reading.used_bytes,
            free_bytes=reading.free_bytes,
            budget_bytes=self.config.budget_bytes,
            process_bytes=own,
            allocated_bytes=alloc.allocated_bytes if alloc else None,
            reserved_bytes=alloc.reserved_bytes if alloc else None,
            foreign=foreign_processes(reading),
            time_s=self._clock(),
        )

    # -- estimates ---------------------------------------------------------------------------

    def _spec(self, name: str) -> ModelSpec:
        spec = self.config.resolve(name)
        if spec is None:
            raise UnknownModel(name, list(self.config.models), list(self.config.defaults))
        return spec

    def get_model_estimate(self, name: str) -> ModelEstimate:
        return planning_estimate(self._spec(name), self.footprints, self.config)

    def can_fit_model(self, name: str) -> bool:
        """Whether the model fits in the room the budget leaves now (nothing is unloaded)."""
        return self.get_model_estimate(name).estimated_vram_bytes <= self.get_snapshot().budget_free_bytes

    def require_free_vram(self, required_gb: float, model_name: str = "model") -> None:
        """Raise ``InsufficientVRAM`` (a ``RuntimeError``) unless ``required_gb`` GiB are free
        within the budget; the message names the shortfall and who else holds memory."""
        need = round(required_gb * GIB)
        snap = self.get_snapshot()
        room = snap.budget_free_bytes
        if need <= room:
            return
        who = describe_processes(snap.foreign)
        raise InsufficientVRAM(
            model_name,
            need,
            room,
            snap.budget_bytes,
            reason=f"{format_gib(snap.used_bytes)} in use on {snap.device_name} ({snap.source})"
            + (f"; other processes: {who}" if who else ""),
        )

    # -- reports -----------------------------------------------------------------------------

    def get_detailed_stats(self) -> dict[str, Any]:
        snap = self.get_snapshot()
        return {
            "source": snap.source,
            "device": snap.device_name,
            "total_bytes": snap.total_bytes,
            "used_bytes": snap.used_bytes,
            "free_bytes": snap.free_bytes,
            "budget_bytes": snap.budget_bytes,
            "budget_free_bytes": snap.budget_free_bytes,
            "process_bytes": snap.process_bytes,
            "allocated_bytes": snap.allocated_bytes,
            "reserved_bytes": snap.reserved_bytes,
            "foreign_processes": [{"pid": pid, "bytes": n} for pid, n in snap.foreign],
            "models": {
                e.name: {
                    "kind": e.kind,
                    "estimate_bytes": e.estimated_vram_bytes,
                    "configured_bytes": e.configured_bytes,
                    "learned_bytes": e.learned_bytes,
                    "drift_bytes": e.drift_bytes,
                    "source": e.source,
                    "confidence": e.confidence,
                    "fits_now": e.estimated_vram_bytes <= snap.budget_free_bytes,
                }
                for e in (self.get_model_estimate(n) for n in self.config.models)
            },
        }

    def print_summary(self, file: TextIO | None = None) -> None:
        out = file or sys.stdout
        s = self.get_detailed_stats()
        g = format_gib
        print(f"{s['device']} ({s['source']})", file=out)
        print(
            f"  total {g(s['total_bytes'])}  used {g(s['used_bytes'])}  free {g(s['free_bytes'])}  "
            f"budget {g(s['budget_bytes'])} ({g(s['budget_free_bytes'])} free within it)",
            file=out,
        )
        if s["reserved_bytes"] is not None:
            print(
                f"  this process: allocated {g(s['allocated_bytes'])}, reserved {g(s['reserved_bytes'])}",
                file=out,
            )
        for p in s["foreign_processes"]:
            print(f"  other process pid {p['pid']}: {g(p['bytes'])}", file=out)
        rows = [("model", "kind", "estimate", "configured", "measured", "drift", "fits now")]
        for name, m in s["models"].items():
            drift = m["drift_bytes"]
            rows.append(
                (
                    name,
                    m["kind"],
                    g(m["estimate_bytes"]),
                    g(m["configured_bytes"]),
                    g(m["learned_bytes"]) if m["learned_bytes"] is not None else "-",
                    ("+" if drift > 0 else "") + g(drift) if drift is not None else "-",
                    "yes" if m["fits_now"] else "no",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)

    def close(self) -> None:
        close = getattr(self.device, "close", None)
        if close is not None:
            close()


@dataclass(frozen=True)
class Sample:
    time_s: float
    used_bytes: int
    by_owner: dict[str, int]  # simulated: per model; NVML: per pid ("pid 1234")


class PeakSampler:
    """Samples the device at ``hz`` into a bounded timeline; reports peaks between marks.

    Run ``await sampler.run()`` in a task (the orchestrator does, in its task group).
    """

    def __init__(
        self, device: Device, hz: float, *, history: int = 20_000, clock: Callable[[], float] = time.monotonic
    ):
        self.device = device
        self.hz = hz
        self.timeline: deque[Sample] = deque(maxlen=history)
        self._clock = clock
        self._t0 = clock()
        self._marks: dict[str, float] = {}
        self.peak_bytes = 0

    def sample(self) -> Sample:
        t = self._clock() - self._t0
        if isinstance(self.device, SimulatedDevice):
            owners = self.device.holders()
            used = sum(owners.values())
        else:
            reading = self.device.read()
            used = reading.used_bytes
            owners = {f"pid {p.pid}": p.used_bytes or 0 for p in reading.processes or ()}
        s = Sample(t, used, owners)
        self.timeline.append(s)
        self.peak_bytes = max(self.peak_bytes, used)
        return s

    async def run(self) -> None:
        if self.hz <= 0:
            return
        period = 1.0 / self.hz
        while True:
            self.sample()
            await anyio.sleep(period)

    def mark(self, name: str) -> None:
        self._marks[name] = self._clock() - self._t0

    def peak_since(self, name: str) -> int:
        """The highest used bytes sampled since ``mark(name)`` (a fresh sample included)."""
        since = self._marks[name]
        self.sample()
        return max((s.used_bytes for s in self.timeline if s.time_s >= since), default=0)


async def wait_released(
    probe: Callable[[], Iterable[tuple[str, int]]],
    *,
    timeout_s: float,
    poll_s: float = 0.005,
    what: str = "",
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Poll ``probe`` (who still holds how many bytes) until it reports nothing, or raise
    ``VRAMNotReleased`` naming who still holds memory after ``timeout_s`` on ``clock`` (the
    orchestrator passes its own, so a virtual-clock run waits in virtual time). Never goes on
    regardless: the next load would find the memory taken."""
    from orchestrator.errors import VRAMNotReleased

    deadline = clock() + timeout_s
    while True:
        held = [(who, n) for who, n in probe() if n > 0]
        if not held:
            return
        if clock() >= deadline:
            names = ", ".join(f"{who} still holds {format_gib(n)}" for who, n in held)
            raise VRAMNotReleased(
                held[0][0],
                f"{names} {timeout_s:g} s after {what or 'unloading'}; the next load waits until it is "
                "back (raise switching.unload_timeout_s if release is slow on this machine)",
            )
        await anyio.sleep(poll_s)
