"""``vram-orchestrator serve --ray ADDRESS``: the daemon's OpenAI-compatible completions in
front of a cluster.

Each completion is leased through the ``ClusterOrchestrator`` (routed to the machine where
its model is resident, or where it is cheapest to bring in) and proxied to that machine's
model server, streaming included, with the daemon's own parts: the body reader and its
limits, the lease options (``X-VRAM-Timeout``, ``X-VRAM-Priority``), the completion limits
(``models.<name>.limits`` of the gateway's config), the pooled upstream connections and the
request that holds its lease for exactly its own duration (``HeldResponse``).

What it serves: ``POST /v1/chat/completions`` and ``/v1/completions`` (server models: the
machines' ``server`` and ``vllm`` backends), ``GET /health``, ``/v1/models`` (every model a
live machine knows, with the machines where it is resident) and ``/v1/status`` (each
machine's snapshot). In-process models (images, speech) run on their machine and are not
served through the cluster gateway (501).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.cluster.client import ClusterOrchestrator
from orchestrator.cluster.machines import Machine
from orchestrator.daemon.app import endpoint, http_error, internal_error
from orchestrator.daemon.asgi import Auth, HeldResponse, Stopper, read_body
from orchestrator.daemon.errors import JSON, ApiError, ASGIApp, Send, dumps
from orchestrator.daemon.gateway import forward
from orchestrator.daemon.requests import completion_limits, lease_options, model_of, parse_json
from orchestrator.daemon.server import listen, resolve_token
from orchestrator.daemon.state import BODY_TIMEOUT_S, STOP_MARGIN_S
from orchestrator.daemon.upstream import Upstreams
from orchestrator.errors import OrchestratorError
from orchestrator.spec import Config
from states.routing import NoRoute

logger = logging.getLogger("orchestrator.cluster")

COMPLETIONS = ("/v1/chat/completions", "/v1/completions")


@dataclass
class ClusterGateway:
    """What the cluster gateway's endpoints share."""

    cluster: ClusterOrchestrator
    config: Config  # the gateway's own config: its daemon settings and the models' limits
    token: str | None
    stopping: Stopper = field(default_factory=Stopper)
    upstreams: Upstreams = field(default_factory=Upstreams)

    def model(self, name: str) -> tuple[str, str | None]:
        """The model ``name`` means on the live machines, and its server's name for it (``None``:
        an in-process model). 404 when no live machine knows it."""
        for snap, alive in self._snapshots():
            model = snap.names.get(name)
            if model is not None and alive:
                return model, snap.served.get(model)
        down = [n for n, a in self.cluster.alive().items() if not a]
        raise ApiError(
            404,
            f"no live machine of the cluster knows the model or kind {name!r}"
            + (f" (down: {', '.join(down)})" if down else "")
            + "; GET /v1/models lists them",
            "model_not_found",
        )

    def _snapshots(self) -> list[tuple[Any, bool]]:
        alive = self.cluster.alive()
        return [(s, alive[n]) for n, s in self.cluster.machines().items() if s is not None]


def cluster_error(exc: BaseException) -> BaseException:
    """A cluster's errors in the daemon's terms: no machine now is 503, a lost lease 502."""
    from orchestrator.daemon.client import LeaseLost

    if isinstance(exc, NoRoute):
        return ApiError(503, str(exc), "no_machine", retry_after_s=5)
    if isinstance(exc, LeaseLost):
        return ApiError(502, f"{exc.message}; retry: the next request goes to a live machine", "lease_lost")
    return exc


def proxy(g: ClusterGateway, path: str) -> Callable[[Request], Awaitable[HeldResponse]]:
    spec = g.config.daemon

    async def handler(request: Request) -> HeldResponse:
        raw = await read_body(request, spec.max_body_bytes, BODY_TIMEOUT_S)
        body = parse_json(raw)
        name = model_of(body)
        model, served = g.model(name)
        if served is None:
            raise ApiError(
                400,
                f"{model!r} runs in-process on its machine, not as a server: the cluster gateway "
                "proxies completions to server models (server or vllm backends) only",
                "invalid_request",
            )
        local = g.config.models.get(model)
        changes = completion_limits(body, local.limits, model) if local is not None else {}
        opts = lease_options(request.headers, spec.request_timeout_s)
        streaming = bool(body.get("stream"))

        async def work(send: Send) -> None:
            try:
                async with g.cluster.acquire(name, timeout=opts.timeout_s, priority=opts.priority) as lease:
                    if lease.url is None:
                        raise ApiError(
                            502, f"{lease.model} on {lease.node} has no server URL", "upstream_error"
                        )
                    upstream_body = dumps({**body, "model": lease.served_model or served, **changes})
                    max_concurrent = local.max_concurrent if local is not None else None
                    up = await g.upstreams.get(f"{lease.node}/{lease.model}", lease.url, max_concurrent)
                    await forward(up, path, upstream_body, send, streaming=streaming)
            except (NoRoute, OrchestratorError) as exc:
                raise cluster_error(exc) from None

        return HeldResponse(work, stop=g.stopping, grace_s=max(0.0, spec.grace_s - STOP_MARGIN_S))

    return handler


def reading_routes(g: ClusterGateway) -> list[Route]:
    async def health(request: Request) -> Response:
        alive = g.cluster.alive()
        status = "stopping" if g.stopping.is_set() else ("ok" if any(alive.values()) else "no_machine")
        return JSON({"status": status, "machines": alive})

    async def models(request: Request) -> Response:
        where: dict[str, dict[str, Any]] = {}
        for snap, alive in g._snapshots():
            if not alive:
                continue
            for model, req in snap.requests.items():
                entry = where.setdefault(
                    model,
                    {"id": model, "object": "model", "created": 0, "owned_by": "vram-orchestrator"},
                )
                entry["kind"] = req.kind
                entry.setdefault("machines", [])
                entry.setdefault("resident_on", [])
                entry["machines"].append(snap.node)
                if snap.cards.gpus_of(model):
                    entry["resident_on"].append(snap.node)
                entry["server"] = model in snap.served
        return JSON({"object": "list", "data": list(where.values())})

    async def status(request: Request) -> Response:
        out = {}
        alive = g.cluster.alive()
        down = g.cluster.down_reasons()
        for name, snap in g.cluster.machines().items():
            entry: dict[str, Any] = {"alive": alive[name], "down_reason": down.get(name)}
            if snap is not None:
                entry.update(
                    {
                        "instance": snap.instance,
                        "address": snap.address,
                        "states": {str(k): v for k, v in snap.states.items()},
                        "committed_bytes": snap.cards.committed_bytes,
                        "budget_bytes": snap.cards.budget_bytes,
                        "residents": [
                            {"model": r.model, "tier": r.tier.value, "vram_bytes": r.vram_bytes}
                            for r in snap.cards.residents
                        ],
                        "leases": dict(snap.leases),
                        "waiting": dict(snap.waiting),
                    }
                )
            out[name] = entry
        return JSON({"running": True, "stopping": g.stopping.is_set(), "machines": out})

    return [
        Route("/health", endpoint(health), methods=["GET"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/status", endpoint(status), methods=["GET"]),
    ]


def create_cluster_app(g: ClusterGateway) -> ASGIApp:
    """The cluster gateway's ASGI app, behind the bearer check."""
    routes = reading_routes(g) + [
        Route(path, endpoint(proxy(g, path)), methods=["POST"]) for path in COMPLETIONS
    ]

    async def not_here(request: Request) -> Response:
        raise ApiError(
            501,
            f"{request.url.path} is not served in front of a cluster: in-process models and remote "
            "leases stay on their machine (use ClusterOrchestrator from Python)",
            "not_implemented",
        )

    for path in ("/v1/images/generations", "/v1/audio/speech", "/v1/leases"):
        routes.append(Route(path, endpoint(not_here), methods=["POST", "GET"]))
    handlers = {HTTPException: http_error, Exception: internal_error}
    return Auth(Starlette(routes=routes, exception_handlers=handlers), token=g.token)


def discover(ray: Any) -> list[str]:
    """The machines of a Ray cluster: the names in its nodes' ``vram-machine:<name>`` resources."""
    from orchestrator.cluster.actor import machine_resource

    prefix = machine_resource("")
    names = {
        key[len(prefix) :]
        for n in ray.nodes()
        if n.get("Alive")
        for key in n.get("Resources", {})
        if key.startswith(prefix)
    }
    return sorted(names)


async def serve_cluster(
    config: Config,
    *,
    address: str,
    machines: Sequence[Machine] | None = None,
    config_path: str | None = None,
    host: str | None = None,
    port: int | None = None,
    token: str | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> list[str]:
    """Serve the gateway in front of the Ray cluster at ``address`` until SIGTERM/SIGINT.

    ``machines``: the machines and their configs; by default every node of the cluster with a
    ``vram-machine:<name>`` resource, each reading ``config_path`` on its own machine (the same
    path, each machine its own file). Returns the machines it served.
    """
    import uvicorn

    from orchestrator.cluster.machines import ray_module as _ray

    spec = config.daemon
    host = host or spec.host
    port = spec.port if port is None else port
    token = resolve_token(config, host, token)
    sock = listen(host, port)
    ray = _ray()
    try:
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False)
        if machines is None:
            names = discover(ray)
            if not names:
                raise OrchestratorError(
                    f"no node of the Ray cluster at {address} has a vram-machine:<name> resource: start "
                    "each GPU machine with `ray start --address=HEAD:6379 "
                    "--resources='{\"vram-machine:NAME\": 1}'`"
                )
            if config_path is None:
                raise OrchestratorError(
                    "give --config: the path of each machine's config file (each machine reads its own)"
                )
            machines = [Machine(n, config_path=config_path) for n in names]
        async with ClusterOrchestrator(machines, address=address) as cluster:
            g = ClusterGateway(cluster, config, token)
            server = uvicorn.Server(
                uvicorn.Config(
                    create_cluster_app(g),
                    lifespan="off",
                    log_level="warning",
                    access_log=False,
                    timeout_graceful_shutdown=math.ceil(spec.grace_s + 5.0),
                    server_header=False,
                )
            )
            loop = asyncio.get_running_loop()
            original = server.handle_exit

            def on_exit(sig: int, frame: Any) -> None:
                original(sig, frame)
                loop.call_soon_threadsafe(g.stopping.set)

            server.handle_exit = on_exit  # type: ignore[method-assign]

            async def announce() -> None:
                while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
                    await anyio.sleep(0.01)
                if on_ready is not None:
                    shown = f"[{host}]" if ":" in host else host
                    on_ready(f"http://{shown}:{sock.getsockname()[1]}")

            async with anyio.create_task_group() as tg:
                tg.start_soon(announce)
                await server.serve(sockets=[sock])
                tg.cancel_scope.cancel()
            g.stopping.set()
            await g.upstreams.aclose()
            return [m.name for m in machines]
    finally:
        sock.close()
