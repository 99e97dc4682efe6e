"""``RemoteOrchestrator`` and the daemon's other client functions; they live in
``orchestrator.daemon.client``, and this name keeps ``from orchestrator.client import ...``."""

from orchestrator.daemon.client import (
    RELEASE_TIMEOUT_S,
    RENEW_FRACTION,
    DaemonUnreachable,
    LeaseLost,
    RemoteError,
    RemoteLease,
    RemoteOrchestrator,
    fetch_events,
    fetch_status,
)

__all__ = [
    "RELEASE_TIMEOUT_S",
    "RENEW_FRACTION",
    "DaemonUnreachable",
    "LeaseLost",
    "RemoteError",
    "RemoteLease",
    "RemoteOrchestrator",
    "fetch_events",
    "fetch_status",
]
