"""The pure core of vram-orchestrator: states, the ledger and planning.

This package contains no IO at all: no anyio, no torch, no yaml, no files, no clocks.
It imports only the standard library and `transitions` (a pure finite-state-machine
library). Everything that touches a GPU, a process or the network lives in
`orchestrator/`, which asks this package what to do and then does it.
"""

from __future__ import annotations

from states.errors import IllegalTransition, InsufficientVRAM, LeaseDeadlock, OrchestratorError
from states.ledger import Ledger, Resident, Tier
from states.machine import TRANSITIONS, ModelMachine, State, active_state
from states.plan import Deferred, Eviction, Plan, PlanRequest, Policy, plan
from states.scheduling import (
    Admission,
    Mode,
    SchedulerView,
    WaiterView,
    admission,
    choose_target,
    rank_targets,
)
from states.step import Decision, Evict, Reap, StepSettings, StepView, Switch, decide
from states.units import GIB, MIB, format_gib, gib_to_bytes

__all__ = [
    "GIB",
    "MIB",
    "TRANSITIONS",
    "Admission",
    "Decision",
    "Deferred",
    "Evict",
    "Eviction",
    "IllegalTransition",
    "InsufficientVRAM",
    "LeaseDeadlock",
    "Ledger",
    "Mode",
    "ModelMachine",
    "OrchestratorError",
    "Plan",
    "PlanRequest",
    "Policy",
    "Reap",
    "Resident",
    "SchedulerView",
    "State",
    "StepSettings",
    "StepView",
    "Switch",
    "Tier",
    "WaiterView",
    "active_state",
    "admission",
    "choose_target",
    "decide",
    "format_gib",
    "gib_to_bytes",
    "plan",
    "rank_targets",
]
