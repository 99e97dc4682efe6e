"""The device protocol: where VRAM figures come from. Sync and cheap (NVML: ~9 us a read).

Three sources implement it: NVML (``nvml.py``: device-wide used/free/total and the per-process
list), torch (``torchmem.py``: ``mem_get_info`` and this process's allocator), and the simulated
device (``simulated.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ProcessUse:
    pid: int
    used_bytes: int | None  # None: the driver would not say (some containers)
    name: str = ""


@dataclass(frozen=True)
class DeviceReading:
    """One reading of the whole device."""

    source: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    processes: tuple[ProcessUse, ...] | None  # None: this source cannot list processes


class Device(Protocol):
    name: str
    source: str  # where the numbers come from: "nvml", "torch" or "simulated"
    total_bytes: int

    def read(self) -> DeviceReading:
        """Used, free and (where the source can tell) who uses what."""
        ...

    def used_bytes(self) -> int:
        """Bytes in use on the whole device, by anyone."""
        ...


class DeviceOutOfMemory(MemoryError):
    """An allocation failed (on the device, or past the limit a backend was loaded with).

    ``requested_bytes`` is the total the owner needed, so the orchestrator can learn it.
    """

    def __init__(self, owner: str, requested_bytes: int, free_bytes: int, *, limit: bool = False) -> None:
        from states.units import format_gib

        self.owner, self.requested_bytes, self.free_bytes = owner, requested_bytes, free_bytes
        where = "of its reserved limit" if limit else "free on the device"
        super().__init__(
            f"out of memory: {owner} needs {format_gib(requested_bytes)}, {format_gib(free_bytes)} {where}"
        )


class DeviceUnavailable(RuntimeError):
    """The requested source cannot be used on this machine (no driver, no CUDA, no package)."""
