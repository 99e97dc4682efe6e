"""A cluster of orchestrators on Ray: one ``OrchestratorActor`` per machine, each a full
``Orchestrator`` on that machine's cards with that machine's config, and a
``ClusterOrchestrator`` with the local ``acquire()`` / ``reserve()`` shape that routes each
request by residency (``states.routing``) and holds its lease on the serving machine.

Install with ``pip install 'vram-orchestrator[ray]'``; see docs/cluster.md.

- ``client.py``: ``ClusterOrchestrator`` (the router);
- ``machines.py``: ``Machine``, ``ClusterLease``, what the router keeps per machine;
- ``actor.py``: ``OrchestratorActor`` (the machine's side: leases, snapshots, events);
- ``snapshot.py``: ``MachineSnapshot``, what a machine sends the router;
- ``wire.py``: errors rebuilt across machines.
"""

from orchestrator.cluster.actor import OrchestratorActor, machine_resource
from orchestrator.cluster.client import ClusterOrchestrator
from orchestrator.cluster.machines import ClusterLease, Machine, ServerAt
from orchestrator.cluster.snapshot import MachineSnapshot, snapshot_of
from orchestrator.cluster.wire import ClusterError
from orchestrator.daemon.client import LeaseLost
from states.routing import NoRoute

__all__ = [
    "ClusterError",
    "ClusterLease",
    "ClusterOrchestrator",
    "LeaseLost",
    "Machine",
    "MachineSnapshot",
    "NoRoute",
    "OrchestratorActor",
    "ServerAt",
    "machine_resource",
    "snapshot_of",
]
