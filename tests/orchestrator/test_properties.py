"""The hypothesis stateful test: random acquires, releases, cancellations, timeouts and
faults against the real Orchestrator on the simulated device.

The invariants (``orchestrator.testing``): committed bytes <= budget after every step and at
every event; the simulated device's peak <= budget; the state matches what is resident
outside a switch; no lease or waiter is lost; every client finishes; nothing is left behind;
a model whose true footprint is larger than its estimate is learned at its true size.
"""

from __future__ import annotations

import dataclasses
import os

from hypothesis import HealthCheck, settings

from orchestrator.config import load_config
from orchestrator.testing import machine_for
from states.units import gib_to_bytes

CONFIG = load_config(None)  # the Model Management Module's models on a 16 GiB card

SETTINGS = settings(
    max_examples=int(os.environ.get("PROPERTY_EXAMPLES", "40")),
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestDesignConfig = machine_for(CONFIG).TestCase
TestDesignConfig.settings = SETTINGS

# A tight budget with a small host tier: more evictions, more HOST -> DISK drops.
TIGHT = dataclasses.replace(CONFIG, budget_bytes=gib_to_bytes(14.6), host_budget_bytes=gib_to_bytes(8))
TestTightBudget = machine_for(TIGHT).TestCase
TestTightBudget.settings = SETTINGS

# True footprints 25% over the estimates (SDXL measured 11.65 GiB on an H200 against the
# module's 10.5): loads fail within their reservation, the orchestrator learns the real sizes,
# and the device still never passes the budget.
TestWrongEstimates = machine_for(CONFIG, footprint_factor=1.25).TestCase
TestWrongEstimates.settings = SETTINGS


# Capacities (one image at a time, two speakers, an LLM batching four) and the wait bound:
# no model ever holds more leases than its max_concurrent, and every waiter is served within
# max_wait_s plus the switches and turns ahead of it. Without faults or foreign memory, which
# may hold a request back for as long as they last.
CAPACITIES = {"llm": 4, "sdxl": 1, "tts": 2}
CAPPED = dataclasses.replace(
    CONFIG,
    models={
        name: dataclasses.replace(spec, max_concurrent=CAPACITIES.get(spec.kind))
        for name, spec in CONFIG.models.items()
    },
)


class CapacityMachine(machine_for(CAPPED)):  # type: ignore[misc]
    check_wait_bound = True

    def inject_fault(self) -> None:  # not a rule here: no faults
        pass

    def foreign_process_takes_memory(self) -> None:  # not a rule here: no foreign memory
        pass


TestCapacities = CapacityMachine.TestCase
TestCapacities.settings = SETTINGS
