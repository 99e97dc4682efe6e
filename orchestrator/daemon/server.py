"""``serve()``: the daemon on uvicorn, its listening socket, signals and the shutdown report.

SIGTERM or SIGINT: no new connections, requests in flight get ``daemon.grace_s`` to finish
(in-process work is then cancelled through its flag and answered in the JSON error shape),
remote leases are cancelled, everything is unloaded, no child process is left; ``serve``
returns a ``ShutdownReport`` that says what was unloaded and what could not be, and why.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import ipaddress
import logging
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from orchestrator.daemon.app import create_app
from orchestrator.daemon.errors import ASGIApp
from orchestrator.daemon.leases import LeaseManager
from orchestrator.daemon.state import Daemon
from orchestrator.errors import OrchestratorError
from orchestrator.runtime import Orchestrator
from orchestrator.spec import Config
from states.units import format_gib

logger = logging.getLogger("orchestrator.daemon")

TOKEN_ENV = "VRAM_ORCHESTRATOR_TOKEN"
BACKSTOP_S = 5.0  # after the grace, how long cancelled work has to answer before uvicorn cancels it


def fast_parts() -> dict[str, str]:
    """The fast implementations uvicorn can use that are installed (the ``fast`` extra):
    ``{"loop": "uvloop", "http": "httptools"}``, each only when it imports."""
    found = {}
    for key, module in (("loop", "uvloop"), ("http", "httptools")):
        try:
            __import__(module)
        except ImportError:
            continue
        found[key] = module
    return found


def event_loop_options() -> dict[str, Any]:
    """``anyio.run``'s backend options for the daemon's event loop: uvloop when installed,
    asyncio's own loop otherwise (on a 2-core VM uvloop alone took a few percent off the CPU
    of a proxied request: the loop was not where the time went)."""
    return {"use_uvloop": True} if "loop" in fast_parts() else {}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(config: Config, host: str, token: str | None) -> str | None:
    """The token to require: the argument, else the environment, else the config. Binding to a
    non-loopback address without one is refused."""
    token = token or os.environ.get(TOKEN_ENV) or config.daemon.token
    if not is_loopback(host) and not token:
        raise OrchestratorError(
            f"binding to {host} (not loopback) needs a bearer token: set daemon.token in the config, "
            f"or {TOKEN_ENV}, or pass --token; or bind to 127.0.0.1"
        )
    return token


class PortInUse(OrchestratorError):
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        super().__init__(
            f"port {port} on {host} is already in use (another vram-orchestrator serve, or another "
            "program, listens there); stop that one, or pass --port with a free port (daemon.port in "
            "the config)"
        )


def listen(host: str, port: int) -> socket.socket:
    """The daemon's listening socket, bound before anything loads (a taken port: ``PortInUse``)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OrchestratorError(f"cannot listen on {host}:{port} ({exc}); check --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(host, port) from None
        raise OrchestratorError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.set_inheritable(False)
    return sock


class _Server:
    """uvicorn's server, told about SIGTERM/SIGINT so that streams end at once, and not
    re-raising the signal after its graceful shutdown (the daemon exits 0 by itself)."""

    def __init__(
        self, app: ASGIApp, sock: socket.socket, grace_s: float, on_exit: Callable[[], None]
    ) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                super().handle_exit(sig, frame)
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured.clear()
                on_exit()

        config = uvicorn.Config(
            app,
            lifespan="off",
            log_level="warning",
            access_log=False,
            # A backstop only: the daemon cancels its requests in flight within their grace (and
            # answers them in the JSON shape); uvicorn's own cancelling would answer plain text.
            timeout_graceful_shutdown=math.ceil(grace_s + BACKSTOP_S),
            server_header=False,
            # httptools parses HTTP when installed (uvicorn's h11 otherwise); the loop is the one
            # serve() runs in (uvloop when started by event_loop_options()).
            http=fast_parts().get("http", "h11"),
        )
        self.sock = sock
        self.server = Server(config)

    def bound_port(self) -> int:
        return int(self.sock.getsockname()[1])


@dataclass
class ShutdownReport:
    """What stopping really did: the models unloaded, those that could not be and why."""

    leases_cancelled: int = 0
    unloaded: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)  # model -> why it is still there

    @property
    def clean(self) -> bool:
        return not self.left

    def line(self) -> str:
        done = f"unloaded {', '.join(self.unloaded)}" if self.unloaded else "nothing was loaded"
        if self.clean:
            return f"stopped; everything unloaded ({done})"
        left = "; ".join(f"{m} ({why})" for m, why in self.left.items())
        return f"stopped; could not unload {left}; {done}"


async def _close(orch: Orchestrator, report: ShutdownReport) -> None:
    """Stop the orchestrator (it unloads everything) and note in ``report`` what happened."""
    await orch.aclose()
    done = orch.shutdown_report
    failed = dict(done.failed) if done is not None else {}
    report.unloaded = list(done.unloaded) if done is not None else []
    for r in orch.ledger().residents:  # still in the ledger: its unload failed
        why = failed.pop(r.model, "its backend did not say why")
        report.left[r.model] = f"{format_gib(r.vram_bytes)} still on the {r.tier.value} tier: {why}"
    report.left.update(failed)  # unloaded, but its memory did not come back (or its close failed)


async def serve(
    config: Config,
    *,
    host: str | None = None,
    port: int | None = None,
    token: str | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> ShutdownReport:
    """Run the daemon until SIGTERM/SIGINT; then stop cleanly (see the module docstring)."""
    spec = config.daemon
    host = host or spec.host
    port = spec.port if port is None else port
    token = resolve_token(config, host, token)
    sock = listen(host, port)  # before anything loads: a taken port fails at once
    report = ShutdownReport()
    loop = asyncio.get_running_loop()
    orch = Orchestrator(config)
    try:
        await orch.__aenter__()
        try:
            async with LeaseManager(orch, spec) as leases:
                d = Daemon(orch, leases, spec, token)

                def on_exit() -> None:
                    loop.call_soon_threadsafe(d.stopping.set)

                server = _Server(create_app(d), sock, spec.grace_s, on_exit)

                async def announce() -> None:
                    while not server.server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
                        await anyio.sleep(0.01)
                    # What the start made (modules, the app, the orchestrator) lives as long as
                    # the daemon: out of the collector's sight, a full collection under load
                    # takes ~15 ms instead of ~100 ms (66 000 objects), a proxied request's tail.
                    gc.freeze()
                    shown = f"[{host}]" if ":" in host else host
                    if on_ready is not None:
                        on_ready(f"http://{shown}:{server.bound_port()}")

                async with anyio.create_task_group() as tg:
                    tg.start_soon(announce)
                    await server.server.serve(sockets=[sock])
                    tg.cancel_scope.cancel()
                d.stopping.set()
                await d.upstreams.aclose()
                report.leases_cancelled = len(leases.leases())
                logger.info("stopping: cancelling %d remote lease(s) and unloading", report.leases_cancelled)
        finally:
            await _close(orch, report)  # (it shields its own unloading)
    finally:
        sock.close()
    return report
