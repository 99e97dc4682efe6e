"""Backends: what loads, unloads, offloads and restores one model."""

from __future__ import annotations

from orchestrator.backends.base import Backend
from orchestrator.backends.simulated import Faults, SimulatedBackend, SimulatedModel

__all__ = ["Backend", "Faults", "SimulatedBackend", "SimulatedModel"]
