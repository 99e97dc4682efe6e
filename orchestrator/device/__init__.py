"""Where VRAM figures come from: the ``Device`` protocol and its three sources."""

from __future__ import annotations

import logging

from orchestrator.device.base import Device, DeviceReading, DeviceUnavailable, ProcessUse
from orchestrator.device.simulated import SimulatedDevice, SimulatedOOM

logger = logging.getLogger("orchestrator.device")

__all__ = [
    "Device",
    "DeviceReading",
    "DeviceUnavailable",
    "ProcessUse",
    "SimulatedDevice",
    "SimulatedOOM",
    "open_device",
    "open_real_device",
]


def open_device(kind: str, index: int = 0, *, total_bytes: int, name: str = "simulated GPU") -> Device:
    """The device a config asks for.

    ``auto`` picks NVML when a driver answers, then torch's CUDA view, and falls back to the
    simulated device only when there is no GPU at all (saying so once, in the log).
    ``nvml`` or ``torch`` that cannot be opened is an error, never a silent fallback.
    """
    from orchestrator.device.nvml import NvmlDevice
    from orchestrator.device.torchmem import TorchDevice

    if kind == "simulated":
        return SimulatedDevice(total_bytes, name=name)
    if kind == "nvml":
        return NvmlDevice(index)
    if kind == "torch":
        return TorchDevice(index)
    if kind != "auto":
        raise ValueError(f"unknown device kind {kind!r}")
    try:
        return open_real_device(index)
    except DeviceUnavailable as exc:
        logger.warning(
            "no GPU found (%s): using the simulated device (%s). Set hardware.device to silence this.",
            exc,
            name,
        )
    return SimulatedDevice(total_bytes, name=name)


def open_real_device(index: int = 0) -> Device:
    """NVML when a driver answers, else torch's CUDA view.

    :raises DeviceUnavailable: neither can be opened (the message says why, for each).
    """
    from orchestrator.device.nvml import NvmlDevice
    from orchestrator.device.torchmem import TorchDevice

    errors = []
    for opener in (NvmlDevice, TorchDevice):
        try:
            return opener(index)
        except DeviceUnavailable as exc:
            errors.append(str(exc))
    raise DeviceUnavailable("; ".join(errors))
