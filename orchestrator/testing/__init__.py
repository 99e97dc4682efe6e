"""Property-test machinery for users' own configs (and this project's own tests).

``OrchestratorMachine`` is a hypothesis ``RuleBasedStateMachine`` that drives a real
``Orchestrator`` on the simulated device: random acquires (with random hold times,
priorities and timeouts), cancellations, injected faults (loads that raise or hang, unloads
that fail, slow releases, foreign processes taking memory) and the passage of time. After
every step, and on every event the orchestrator emits, it checks the invariants:

- committed bytes (resident + loading) never exceed the budget;
- a load begins only when its plan fits the budget less what other processes hold;
- the simulated device's peak of our own memory never exceeds the budget;
- outside a switch, the state matches what is resident;
- no lease or waiter is lost: a shadow of the queue (per model, the clients that wait and
  those that hold) equals the orchestrator's queue and leases;
- no model holds more leases at once than its ``max_concurrent`` (counted from the events);
- with ``check_wait_bound`` (for runs without faults or foreign memory, which may hold a
  request back without bound), every served client waited at most ``wait_bound_s``;
- at the end, every client has finished (none starved or hung), nothing is left on the device
  and the machine is IDLE.

Use it on a config (one card or several)::

    from orchestrator.testing import machine_for
    TestMyConfig = machine_for(load_config("my.yaml")).TestCase

Requires hypothesis (the ``dev`` extra); importing ``orchestrator`` alone does not.
"""

from __future__ import annotations

import math
from typing import Any

from orchestrator.config import Config
from orchestrator.testing.cards import CardsMachine
from orchestrator.testing.machine import (
    EXPECTED_ERRORS,
    InvariantViolation,
    OrchestratorMachine,
    Unusable,
    left_on,
    quiet_expected_failures,
    scaled,
    unusable_models,
)

__all__ = [
    "EXPECTED_ERRORS",
    "CardsMachine",
    "InvariantViolation",
    "OrchestratorMachine",
    "Unusable",
    "left_on",
    "machine_for",
    "quiet_expected_failures",
    "scaled",
    "unusable_models",
]


def machine_for(
    config: Config, *, time_scale: float | None = None, footprint_factor: float = 1.0
) -> type[OrchestratorMachine]:
    """A state machine class bound to ``config`` (use its ``.TestCase`` in a test module)."""
    attrs: dict[str, Any] = {"config": config, "footprint_factor": footprint_factor}
    if time_scale is not None and not math.isnan(time_scale):
        attrs["time_scale"] = time_scale
    base: type[OrchestratorMachine] = CardsMachine if len(config.cards) > 1 else OrchestratorMachine
    return type("OrchestratorMachineFor", (base,), attrs)
