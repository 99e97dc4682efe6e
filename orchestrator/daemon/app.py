"""The daemon's routes: an ASGI app (Starlette) around one running ``Orchestrator``.

Reading (``/health``, ``/v1/status``, ``/v1/models``, ``/v1/models/{id}``, ``/metrics``,
``/v1/events``), remote leases (``/v1/leases``, ``leases.py``) and the OpenAI-compatible
gateway (``gateway.py``). Each handler parses its request (``requests.py``), then acts; an
error of any kind becomes OpenAI's error shape (``errors.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.daemon import gateway
from orchestrator.daemon.asgi import Auth, HeldResponse
from orchestrator.daemon.errors import JSON, ApiError, ASGIApp, Receive, Scope, Send, api_error, send_json
from orchestrator.daemon.requests import model_name, parse_lease, shorten
from orchestrator.daemon.state import Daemon, daemon_status
from orchestrator.errors import NotRunning
from orchestrator.events import Event
from orchestrator.metrics import OrchestratorMetrics

logger = logging.getLogger("orchestrator.daemon")

KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream

Handler = Callable[[Request], Awaitable[Response | HeldResponse]]


def endpoint(fn: Handler) -> Callable[[Request], Awaitable[Any]]:
    """A handler whose errors become JSON answers."""

    async def wrapped(request: Request) -> Any:
        try:
            return await fn(request)
        except Exception as exc:
            return api_error(exc).response()

    return wrapped


def _sse(e: Event) -> bytes:
    return f"event: {e.kind}\ndata: {json.dumps(e.to_dict())}\n\n".encode()


def model_entry(d: Daemon, name: str) -> dict[str, Any]:
    """One model as ``GET /v1/models`` lists it (OpenAI's model object, with our fields)."""
    orch = d.orch
    s = orch.config.models[name]
    ledger = orch.ledger()
    loading = ledger.loading is not None and ledger.loading.model == name
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "vram-orchestrator",
        "kind": s.kind,
        "aliases": list(s.aliases),
        "default": orch.config.defaults.get(s.kind) == name,
        "backend": s.backend,
        "tier": "loading" if loading else ledger.tier_of(name).value,
        "vram_bytes": orch.estimate(name).estimated_vram_bytes,
        "configured_bytes": s.vram_bytes,
        "host_bytes": s.host_bytes if s.offload else None,
        "leases": orch.leases().get(name, 0),
    }


def reading_routes(d: Daemon, metrics: OrchestratorMetrics) -> list[Route]:
    orch = d.orch

    async def health(request: Request) -> Response:
        return JSON({"status": "stopping" if d.stopping.is_set() else "ok"})

    async def status(request: Request) -> Response:
        return JSON(daemon_status(d))

    async def models(request: Request) -> Response:
        return JSON({"object": "list", "data": [model_entry(d, name) for name in orch.config.models]})

    async def model(request: Request) -> Response:
        # The openai client's models.retrieve(id); an alias or kind names its model too.
        s = orch.resolve(model_name(request.path_params["model_id"]))
        return JSON(model_entry(d, s.name))

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    async def events(request: Request) -> HeldResponse:
        history = request.query_params.get("history", "").lower() in ("1", "true", "yes")
        # follow=0: the recent events, then the end of the response (the timeline command)
        follow = request.query_params.get("follow", "1").lower() not in ("0", "false", "no")
        send_events, receive_events = anyio.create_memory_object_stream[Event](10_000)
        backlog = orch.hub.history if history else []

        def listen(e: Event) -> None:
            try:
                send_events.send_nowait(e)
            except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

        remove = orch.add_listener(listen)  # in the same instant as the backlog: no gap

        async def work(send: Send) -> None:
            try:
                headers = [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                for e in backlog:
                    await send({"type": "http.response.body", "body": _sse(e), "more_body": True})
                if not follow:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                while True:
                    with anyio.move_on_after(KEEPALIVE_S) as keepalive:
                        e = await receive_events.receive()
                    body = b": keep-alive\n\n" if keepalive.cancelled_caught else _sse(e)
                    await send({"type": "http.response.body", "body": body, "more_body": True})
            finally:
                remove()
                send_events.close()
                receive_events.close()

        return HeldResponse(work, stop=d.stopping)

    return [
        Route("/health", endpoint(health), methods=["GET"]),
        Route("/v1/status", endpoint(status), methods=["GET"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", endpoint(model), methods=["GET"]),
        Route("/metrics", endpoint(prometheus), methods=["GET"]),
        Route("/v1/events", endpoint(events), methods=["GET"]),
    ]


def lease_routes(d: Daemon) -> list[Route]:
    orch, spec = d.orch, d.spec

    async def open_lease(request: Request) -> HeldResponse:
        body = await gateway.read_json(d, request)
        req = parse_lease(
            body,
            default_ttl_s=spec.lease_ttl_s,
            max_ttl_s=spec.max_lease_ttl_s,
            budget_bytes=orch.config.budget_bytes,
        )
        if req.model is not None:
            orch.resolve(req.model)  # 404 at once for an unknown model
        if d.stopping.is_set():
            raise NotRunning()

        async def work(send: Send) -> None:
            rl = await d.leases.open(
                model=req.model,
                n_bytes=req.n_bytes,
                priority=req.priority,
                timeout_s=req.timeout_s,
                ttl_s=req.ttl_s,
                pid=req.pid,
                holder=req.holder or (request.client.host if request.client else ""),
                # Leases of one named holder (RemoteOrchestrator names each of its tasks) count
                # as one owner: a holder that waits for a model its own lease keeps out is
                # told at once (409), as a task in process is.
                owner=("remote", req.holder) if req.holder else None,
            )
            await send_json(send, 200, rl.to_dict())

        return HeldResponse(work, stop=d.stopping)

    async def renew_lease(request: Request) -> Response:
        return JSON(d.leases.renew(request.path_params["lease_id"]).to_dict())

    async def release_lease(request: Request) -> Response:
        rl = await d.leases.release(request.path_params["lease_id"])
        return JSON({**rl.to_dict(), "released": True})

    async def list_leases(request: Request) -> Response:
        return JSON({"object": "list", "data": [rl.to_dict() for rl in d.leases.leases()]})

    return [
        Route("/v1/leases", endpoint(open_lease), methods=["POST"]),
        Route("/v1/leases", endpoint(list_leases), methods=["GET"]),
        Route("/v1/leases/{lease_id}/renew", endpoint(renew_lease), methods=["POST"]),
        Route("/v1/leases/{lease_id}", endpoint(release_lease), methods=["DELETE"]),
    ]


def gateway_routes(d: Daemon) -> list[Route]:
    return [
        Route("/v1/chat/completions", endpoint(gateway.proxy(d, "/v1/chat/completions")), methods=["POST"]),
        Route("/v1/completions", endpoint(gateway.proxy(d, "/v1/completions")), methods=["POST"]),
        Route("/v1/images/generations", endpoint(gateway.images(d)), methods=["POST"]),
        Route("/v1/audio/speech", endpoint(gateway.speech(d)), methods=["POST"]),
    ]


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong method) in OpenAI's error shape."""
    code = int(getattr(exc, "status_code", 404))
    what = {404: "no such endpoint", 405: "method not allowed here"}.get(
        code, str(getattr(exc, "detail", ""))
    )
    return ApiError(
        code,
        f"{request.method} {shorten(request.url.path)}: {what}; see the daemon's endpoints in the README",
        {404: "not_found", 405: "method_not_allowed"}.get(code, "invalid_request"),
    ).response()


async def internal_error(request: Request, exc: Exception) -> Response:
    """The last resort (a bug): JSON, with the error's name but never a traceback."""
    logger.error("request %s %s failed", request.method, shorten(request.url.path), exc_info=exc)
    return api_error(exc).response()


class FastRoutes:
    """The proxied completions straight to their handler (``POST`` to the exact path), past
    Starlette's router and middlewares, which cost a good part of a proxied request's CPU
    (each wraps ``send``, so every chunk of a stream went through three more calls);
    everything else (another method: 405) to the app."""

    def __init__(self, app: ASGIApp, routes: dict[str, ASGIApp]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            fast = self.routes.get(scope["path"])
            if fast is not None:
                try:
                    await fast(scope, receive, send)
                except Exception as exc:  # a bug: answered as internal_error answers it
                    logger.error("request POST %s failed", shorten(scope["path"]), exc_info=exc)
                    with contextlib.suppress(RuntimeError):  # (unless the answer had begun)
                        await api_error(exc).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(d: Daemon) -> ASGIApp:
    """The daemon's ASGI app: every route, behind the bearer check."""
    if d.metrics is None:
        d.metrics = OrchestratorMetrics(d.orch)
    routes = reading_routes(d, d.metrics) + lease_routes(d) + gateway_routes(d)
    handlers = {HTTPException: http_error, Exception: internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    fast = {path: gateway.proxy_app(d, path) for path in ("/v1/chat/completions", "/v1/completions")}
    return Auth(FastRoutes(app, fast), d.token)
