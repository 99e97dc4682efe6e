"""vram-orchestrator: share one GPU between several heavy models, safely and fast.

``import orchestrator`` stays light: it never imports torch (the real backends import their
heavy dependencies lazily, when a config uses them).
"""

from __future__ import annotations

from orchestrator.compat import LLMStatus, ModelManager, ServiceController
from orchestrator.config import Config, ModelSpec, load_config, parse_config
from orchestrator.errors import (
    AcquireTimeout,
    BackendCrashed,
    BackendError,
    BackendOutOfMemory,
    ConfigError,
    IllegalTransition,
    InsufficientVRAM,
    LeaseDeadlock,
    LeaseEnded,
    LoadFailed,
    NotRunning,
    OrchestratorError,
    UnknownModel,
    UnloadFailed,
    VRAMNotReleased,
)
from orchestrator.events import Event
from orchestrator.footprints import Footprint, FootprintStore
from orchestrator.monitor import ModelEstimate, PeakSampler, VRAMMonitor, VRAMSnapshot
from orchestrator.runtime import Lease, Orchestrator, Statistics
from states import Ledger, State, Tier

__version__ = "0.1.0"

__all__ = [
    "AcquireTimeout",
    "BackendCrashed",
    "BackendError",
    "BackendOutOfMemory",
    "Config",
    "ConfigError",
    "Event",
    "Footprint",
    "FootprintStore",
    "IllegalTransition",
    "InsufficientVRAM",
    "LLMStatus",
    "Lease",
    "LeaseDeadlock",
    "LeaseEnded",
    "Ledger",
    "LoadFailed",
    "ModelEstimate",
    "ModelManager",
    "ModelSpec",
    "NotRunning",
    "Orchestrator",
    "OrchestratorError",
    "PeakSampler",
    "ServiceController",
    "State",
    "Statistics",
    "Tier",
    "UnknownModel",
    "UnloadFailed",
    "VRAMMonitor",
    "VRAMNotReleased",
    "VRAMSnapshot",
    "load_config",
    "parse_config",
]
