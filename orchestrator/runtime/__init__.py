"""The runtime: one place decides, one place does.

- ``orchestrator.py``: the ``Orchestrator`` facade (lifecycle, acquire/reserve/unload, reads);
- ``queue.py``: the waiter queue and the lease book (``hold()``: the life of one acquire);
- ``scheduler.py``: the loop that snapshots, calls ``states.step.decide`` and applies it;
- ``executor.py``: the actions (the switch, evictions, reaping, the shutdown) and the one load
  path; ``unloading.py``: the one unload path they share;
- ``accounting.py``: device readings, foreign memory, room checks, learned footprints;
- ``watch.py``: crash watchers; ``externals.py``: raw-bytes reservations;
- ``context.py``: the shared books (the ledger, the machine, events); ``stats.py``: counters.
"""

from orchestrator.runtime.lease import EXTERNAL_KIND, ExternalReservation, Lease
from orchestrator.runtime.orchestrator import Orchestrator
from orchestrator.runtime.outcomes import ShutdownReport
from orchestrator.runtime.stats import WAIT_SAMPLES, Statistics, WaitStats

__all__ = [
    "EXTERNAL_KIND",
    "WAIT_SAMPLES",
    "ExternalReservation",
    "Lease",
    "Orchestrator",
    "ShutdownReport",
    "Statistics",
    "WaitStats",
]
