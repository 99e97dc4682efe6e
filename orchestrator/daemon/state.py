"""What the daemon's endpoints share, and the status report only a running daemon has."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.daemon.asgi import Stopper
from orchestrator.daemon.leases import LeaseManager
from orchestrator.daemon.upstream import Upstreams
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.runtime import Orchestrator
from orchestrator.spec import DaemonSpec
from orchestrator.status import status_report

BODY_TIMEOUT_S = 30.0  # a request body must arrive within this (a slow or stalled client: 408)
STOP_MARGIN_S = 0.5  # requests in flight are cancelled this long before their grace runs out


@dataclass
class Daemon:
    """What the endpoints share."""

    orch: Orchestrator
    leases: LeaseManager
    spec: DaemonSpec
    token: str | None
    stopping: Stopper = field(default_factory=Stopper)
    metrics: OrchestratorMetrics | None = None
    upstreams: Upstreams = field(default_factory=Upstreams)  # the gateway's pools to servers
    body_timeout_s: float = BODY_TIMEOUT_S
    work_timeout_s: float | None = None  # a request's work after its grant; None: request_timeout_s

    @property
    def work_deadline_s(self) -> float:
        return self.spec.request_timeout_s if self.work_timeout_s is None else self.work_timeout_s

    @property
    def in_flight_grace_s(self) -> float:
        """How long a gateway request may still run once the daemon is stopping: its grace,
        less a margin for its work to stop (a step) and answer, so that it answers in time."""
        return max(0.0, self.spec.grace_s - STOP_MARGIN_S)


def daemon_status(d: Daemon) -> dict[str, Any]:
    """``status_report`` plus what only a running daemon has: leases and reservations."""
    report = status_report(d.orch)
    report["running"] = True
    report["stopping"] = d.stopping.is_set()
    report["instance"] = d.leases.instance_id
    report["leases"] = [rl.to_dict() for rl in d.leases.leases()]
    usage = {r.id: used for r, used in d.orch.check_external_usage()}
    ledger = d.orch.ledger()
    report["external"] = [
        {**r.to_dict(), "granted": ledger.on_gpu(r.id), "used_bytes": usage.get(r.id)}
        for r in d.orch.external_reservations()
    ]
    report["external_bytes"] = ledger.external_bytes
    stats = d.orch.statistics()
    report["statistics"] = {
        "switches": stats.switches,
        "failed_switches": stats.failed_switches,
        "loads": stats.loads,
        "restores": stats.restores,
        "evictions": stats.evictions,
        "grants": stats.grants,
        "releases": stats.releases,
        "timeouts": stats.timeouts,
        "cancellations": stats.cancellations,
        "peak_committed_bytes": stats.peak_committed_bytes,
    }
    return report
