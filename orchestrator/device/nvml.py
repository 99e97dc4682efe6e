"""NVML through ``nvidia-ml-py`` (the ``pynvml`` module): the driver's own figures.

Device-wide used/free/total, and the per-process list with pids and bytes, which is what lets
the orchestrator tell its own memory from other processes' (a desktop, another user's job).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from orchestrator.device.base import DeviceReading, DeviceUnavailable, ProcessUse

logger = logging.getLogger("orchestrator.device")

_init_lock = threading.Lock()
_init_count = 0


def _pynvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise DeviceUnavailable("NVML needs nvidia-ml-py: pip install nvidia-ml-py") from exc
    return pynvml


def nvml_available() -> bool:
    """Whether an NVIDIA driver answers (cheap; leaves NVML initialised only while used)."""
    try:
        dev = NvmlDevice(0)
    except DeviceUnavailable:
        return False
    dev.close()
    return True


class NvmlDevice:
    source = "nvml"

    def __init__(self, index: int = 0) -> None:
        global _init_count
        nv = _pynvml()
        self._nv = nv
        with _init_lock:
            try:
                nv.nvmlInit()
            except nv.NVMLError as exc:
                raise DeviceUnavailable(f"no NVIDIA driver answers ({exc})") from None
            _init_count += 1
        self._closed = False
        try:
            count = nv.nvmlDeviceGetCount()
            if index >= count:
                raise DeviceUnavailable(f"GPU index {index} does not exist: this machine has {count} GPU(s)")
            self._handle = nv.nvmlDeviceGetHandleByIndex(index)
            name = nv.nvmlDeviceGetName(self._handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
            self.index = index
            self.total_bytes = int(nv.nvmlDeviceGetMemoryInfo(self._handle).total)
        except BaseException:
            self.close()
            raise

    def read(self) -> DeviceReading:
        nv = self._nv
        mem = nv.nvmlDeviceGetMemoryInfo(self._handle)
        procs: dict[int, ProcessUse] = {}
        for getter in (nv.nvmlDeviceGetComputeRunningProcesses, nv.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                found = getter(self._handle)
            except nv.NVMLError as exc:
                logger.debug("NVML process list unavailable: %s", exc)
                continue
            for p in found:
                raw = getattr(p, "usedGpuMemory", None)
                used = int(raw) if raw is not None and int(raw) >= 0 else None
                pid = int(p.pid)
                prev = procs.get(pid)
                if prev is not None:  # listed as compute and graphics: add what is known
                    known = [x for x in (prev.used_bytes, used) if x is not None]
                    used = sum(known) if known else None
                procs[pid] = ProcessUse(pid, used)
        return DeviceReading(
            source=self.source,
            total_bytes=int(mem.total),
            used_bytes=int(mem.used),
            free_bytes=int(mem.free),
            processes=tuple(sorted(procs.values(), key=lambda p: p.pid)),
        )

    def used_bytes(self) -> int:
        return int(self._nv.nvmlDeviceGetMemoryInfo(self._handle).used)

    def close(self) -> None:
        global _init_count
        if self._closed:
            return
        self._closed = True
        with _init_lock:
            _init_count -= 1
            if _init_count == 0:
                try:
                    self._nv.nvmlShutdown()
                except self._nv.NVMLError:  # pragma: no cover
                    pass


def discover_cards() -> list[tuple[int, str, int]]:
    """Every card the driver knows: (index, name, total bytes); empty without a driver."""
    if not nvml_available():
        return []
    nvml = _pynvml()
    with _init_lock:
        nvml.nvmlInit()
        try:
            out = []
            for i in range(nvml.nvmlDeviceGetCount()):
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                name = nvml.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else str(name)
                out.append((i, name, int(nvml.nvmlDeviceGetMemoryInfo(h).total)))
            return out
        finally:
            nvml.nvmlShutdown()
