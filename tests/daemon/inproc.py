"""The daemon's ASGI app in this process (httpx's ASGI transport): fast handler tests, with
the orchestrator on a simulated device that the tests can read."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from orchestrator import Orchestrator, load_config
from orchestrator.daemon import Daemon, LeaseManager, create_app
from orchestrator.daemon.errors import ASGIApp
from orchestrator.device.simulated import SimulatedDevice


@dataclass
class Running:
    daemon: Daemon
    client: httpx.AsyncClient
    device: SimulatedDevice
    app: ASGIApp

    @property
    def orch(self) -> Orchestrator:
        return self.daemon.orch

    def settled(self) -> bool:
        """No lease, nothing switching, and the ledger says what the device holds."""
        ledger = self.orch.ledger()
        if self.daemon.leases.leases() or any(self.orch.leases().values()) or ledger.loading is not None:
            return False
        if self.orch.external_reservations():
            return False
        return all((self.device.held_by(name) > 0) == ledger.on_gpu(name) for name in self.orch.backends)


@asynccontextmanager
async def running_daemon(
    config_path: Path, *, token: str | None = None, instance_id: str | None = None, **daemon_kw: Any
) -> AsyncIterator[Running]:
    config = load_config(config_path)
    device = SimulatedDevice(config.total_bytes)
    async with Orchestrator(config, device=device) as orch:
        async with LeaseManager(orch, config.daemon, instance_id=instance_id) as leases:
            d = Daemon(orch, leases, config.daemon, token, **daemon_kw)
            app = create_app(d)
            transport = httpx.ASGITransport(app=app)
            headers = {"authorization": f"Bearer {token}"} if token else {}
            async with httpx.AsyncClient(
                transport=transport, base_url="http://daemon", headers=headers, timeout=30
            ) as client:
                yield Running(d, client, device, app)
            d.stopping.set()
            await d.upstreams.aclose()  # the gateway's connections to servers (serve() closes them too)
