"""Where VRAM figures come from: the ``Device`` protocol and its implementations."""

from __future__ import annotations

from orchestrator.device.base import Device
from orchestrator.device.simulated import SimulatedDevice, SimulatedOOM

__all__ = ["Device", "SimulatedDevice", "SimulatedOOM"]
