"""``vram-orchestrator serve``: one owner for the GPU across processes.

An ASGI app (Starlette on uvicorn) around one running ``Orchestrator``:

- an OpenAI-compatible gateway that switches by the requested model: ``/v1/chat/completions``
  and ``/v1/completions`` are proxied (streaming included) to the model's server, and
  ``/v1/images/generations`` and ``/v1/audio/speech`` run in-process models
  (``orchestrator.media``). Each request holds a lease for exactly its own duration: until
  its response (or stream) ends, or at once when its client disconnects;
- remote leases (``/v1/leases``) for programs that use the GPU themselves: on a model (the
  answer names the model's URL for servers) or on a raw number of bytes (an external
  reservation: the scheduler evicts our models to make room, and the program's real use is
  checked by pid). The holder renews its lease; one not renewed within its ttl expires;
- ``/v1/status``, ``/v1/models``, ``/metrics`` (Prometheus) and ``/v1/events`` (server-sent
  events of the orchestrator's events).

Every error is JSON in OpenAI's shape, ``{"error": {"message", "type", "code"}}``, and says
what is wrong and what to do. Bound to a non-loopback address, the daemon requires a bearer
token. SIGTERM or SIGINT: no new connections, requests in flight get ``daemon.grace_s`` to
finish, remote leases are cancelled, everything is unloaded, no child process is left.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping, MutableMapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from anyio.abc import TaskGroup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from orchestrator.backends.server import ServerBackend, ServerHandle
from orchestrator.config import Config, DaemonSpec
from orchestrator.errors import (
    AcquireTimeout,
    BackendCrashed,
    BackendError,
    LeaseDeadlock,
    NotRunning,
    OrchestratorError,
    UnknownModel,
)
from orchestrator.events import Event
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.runtime import EXTERNAL_KIND, Lease, Orchestrator
from orchestrator.status import status_report
from states.errors import InsufficientVRAM
from states.units import format_gib

logger = logging.getLogger("orchestrator.daemon")

TOKEN_ENV = "VRAM_ORCHESTRATOR_TOKEN"
REAP_PERIOD_S = 0.05  # how often expired remote leases are looked for
KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
ENDED_KEPT = 1000  # ended lease ids remembered, so that a late renew hears why

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- errors ------------------------------------------------------------------------------------


class ApiError(Exception):
    """An answer with an error status: ``message`` says what is wrong and what to do."""

    def __init__(self, status: int, message: str, type_: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.retry_after_s = status, message, type_, retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.status}}

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(math.ceil(self.retry_after_s))} if self.retry_after_s is not None else {}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())


def api_error(exc: BaseException) -> ApiError:
    """The HTTP answer for an orchestrator error."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownModel):
        return ApiError(404, f"{exc}; GET /v1/models lists them", "model_not_found")
    if isinstance(exc, InsufficientVRAM):
        if exc.required_bytes > exc.budget_bytes:
            return ApiError(400, str(exc), "insufficient_vram")
        return ApiError(503, str(exc), "insufficient_vram", retry_after_s=5)
    if isinstance(exc, AcquireTimeout):
        return ApiError(503, f"{exc}; retry later or with a longer timeout", "timeout", retry_after_s=5)
    if isinstance(exc, LeaseDeadlock):
        return ApiError(409, str(exc), "lease_deadlock")
    if isinstance(exc, BackendCrashed):
        return ApiError(503, f"{exc}; the next request starts it again", "backend_crashed", retry_after_s=1)
    if isinstance(exc, BackendError):
        return ApiError(503, str(exc), "backend_unavailable", retry_after_s=5)
    if isinstance(exc, NotRunning):
        return ApiError(503, "the daemon is shutting down; retry against its next start", "shutting_down")
    if isinstance(exc, OrchestratorError | ValueError):
        return ApiError(400, str(exc), "invalid_request")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


# -- raw ASGI helpers ----------------------------------------------------------------------------


async def send_json(send: Send, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": data})


class _Started:
    """Tracks whether a response has begun (after that, an error can only end the stream)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.finished = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self._send(message)


class HeldResponse:
    """An ASGI response that does all its work in the request's own task, so that a lease
    taken in it is released in the task that took it: ``work(send)`` runs until it has sent
    its response, and is cancelled the moment the client disconnects."""

    def __init__(self, work: Callable[[Send], Awaitable[None]], *, stop: anyio.Event | None = None) -> None:
        self.work = work
        self.stop = stop  # set: the work is cancelled (the daemon is stopping)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracked = _Started(send)
        disconnected = False
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                nonlocal disconnected
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        disconnected = True
                        tg.cancel_scope.cancel()
                        return

            async def watch_stop() -> None:
                assert self.stop is not None
                await self.stop.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            if self.stop is not None:
                tg.start_soon(watch_stop)
            try:
                await self.work(tracked)
            except Exception as exc:
                err = api_error(exc)
                if err.status >= 500 and not isinstance(exc, OrchestratorError | ApiError):
                    logger.exception("request failed")
                if not tracked.started:
                    await send_json(send, err.status, err.body(), err.headers())
            finally:
                tg.cancel_scope.cancel()
        if not disconnected and tracked.started and not tracked.finished:
            # Stopped mid-stream (the daemon is shutting down): end the body properly.
            await send({"type": "http.response.body", "body": b""})
        elif not disconnected and not tracked.started:
            await send_json(send, 503, api_error(NotRunning()).body())


# -- remote leases -------------------------------------------------------------------------------


class LeaseGone(ApiError):
    pass


@dataclass(eq=False)
class RemoteLease:
    id: str
    model: str  # a configured model, or an external reservation's id once granted
    kind: str
    vram_bytes: int
    ttl_s: float
    priority: int
    pid: int | None
    holder: str
    url: str | None = None
    expires_s: float = math.inf  # monotonic; the ttl counts from the grant
    waited_s: float = 0.0
    granted: anyio.Event = field(default_factory=anyio.Event)
    released: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    error: BaseException | None = None
    end_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "id": self.id,
            "model": self.model,
            "kind": self.kind,
            "bytes": self.vram_bytes,
            "url": self.url,
            "ttl_s": self.ttl_s,
            "expires_at": time.time() + (self.expires_s - now) if self.expires_s != math.inf else None,
            "expires_in_s": max(0.0, self.expires_s - now) if self.expires_s != math.inf else None,
            "waited_s": self.waited_s,
            "priority": self.priority,
            "pid": self.pid,
            "holder": self.holder,
            "granted": self.granted.is_set() and self.error is None,
        }


class LeaseManager:
    """Remote leases: each is held by a task of its own (the orchestrator's lease is entered
    and left in that task), until released, expired, cancelled or its model crashes."""

    def __init__(self, orch: Orchestrator, spec: DaemonSpec) -> None:
        self.orch = orch
        self.spec = spec
        self._leases: dict[str, RemoteLease] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._seq = 0
        self._tg: TaskGroup | None = None

    async def __aenter__(self) -> LeaseManager:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._reap, name="vram-orchestrator lease reaper")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        tg, self._tg = self._tg, None
        if tg is None:
            return
        for rl in list(self._leases.values()):
            self._end(rl, "cancelled: the daemon is shutting down")
        tg.cancel_scope.cancel()
        await tg.__aexit__(None, None, None)

    def leases(self) -> list[RemoteLease]:
        return list(self._leases.values())

    async def open(
        self,
        *,
        model: str | None,
        n_bytes: int | None,
        priority: int,
        timeout_s: float | None,
        ttl_s: float,
        pid: int | None,
        holder: str,
        owner: Hashable | None = None,
    ) -> RemoteLease:
        """Wait for the lease (cancelled with the request) and return it, granted."""
        if self._tg is None:
            raise NotRunning()
        self._seq += 1
        cm: AbstractAsyncContextManager[Lease]
        if model is not None:
            spec = self.orch.resolve(model)
            cm = self.orch.acquire(spec.name, timeout=timeout_s, priority=priority, owner=owner)
            rl = RemoteLease(
                f"lease-{self._seq}",
                spec.name,
                spec.kind,
                self.orch.estimate(spec.name).estimated_vram_bytes,
                ttl_s,
                priority,
                pid,
                holder,
            )
        else:
            assert n_bytes is not None
            cm = self.orch.reserve(
                n_bytes, timeout=timeout_s, priority=priority, pid=pid, holder=holder, owner=owner
            )
            rl = RemoteLease(f"lease-{self._seq}", "", EXTERNAL_KIND, n_bytes, ttl_s, priority, pid, holder)
        self._leases[rl.id] = rl
        self._tg.start_soon(self._hold, rl, cm, name=f"vram-orchestrator {rl.id}")
        try:
            await rl.granted.wait()
        except BaseException:
            self._end(rl, "cancelled while waiting: the client went away")
            raise
        if rl.error is not None:
            raise rl.error
        return rl

    async def _hold(self, rl: RemoteLease, cm: AbstractAsyncContextManager[Lease]) -> None:
        try:
            with rl.scope:
                async with cm as lease:
                    rl.model = lease.model
                    rl.waited_s = lease.waited_s
                    handle = lease.handle
                    rl.url = handle.base_url if isinstance(handle, ServerHandle) else None
                    rl.expires_s = time.monotonic() + rl.ttl_s
                    rl.granted.set()
                    await rl.released.wait()
        except Exception as exc:
            rl.error = exc
            if not rl.end_reason:
                rl.end_reason = f"ended: {exc}"
            logger.warning("remote lease %s on %s ended: %s", rl.id, rl.model or rl.kind, exc)
        finally:
            self._leases.pop(rl.id, None)
            self._ended[rl.id] = rl.end_reason or "released"
            while len(self._ended) > ENDED_KEPT:
                self._ended.popitem(last=False)
            rl.granted.set()
            rl.done.set()

    def _end(self, rl: RemoteLease, reason: str) -> None:
        if not rl.end_reason:
            rl.end_reason = reason
        rl.released.set()
        if not rl.granted.is_set():
            rl.scope.cancel()  # still waiting for its grant: stop waiting

    def get(self, lease_id: str) -> RemoteLease:
        rl = self._leases.get(lease_id)
        if rl is None or rl.released.is_set():
            why = self._ended.get(lease_id) or (rl.end_reason if rl is not None else None)
            if why is not None:
                raise LeaseGone(410, f"lease {lease_id!r} has ended ({why}); acquire a new one", "lease_gone")
            raise LeaseGone(
                404, f"no lease {lease_id!r}; acquire one with POST /v1/leases", "lease_not_found"
            )
        return rl

    def renew(self, lease_id: str) -> RemoteLease:
        rl = self.get(lease_id)
        rl.expires_s = time.monotonic() + rl.ttl_s
        return rl

    async def release(self, lease_id: str) -> RemoteLease:
        rl = self.get(lease_id)
        self._end(rl, "released by its holder")
        await rl.done.wait()  # the orchestrator has it back when this answers
        return rl

    async def _reap(self) -> None:
        while True:
            now = time.monotonic()
            for rl in list(self._leases.values()):
                if rl.granted.is_set() and not rl.released.is_set() and rl.expires_s <= now:
                    reason = f"expired: not renewed within its ttl of {rl.ttl_s:g} s"
                    logger.warning("remote lease %s on %s %s", rl.id, rl.model, reason)
                    self.orch.emit_event("lease_expired", model=rl.model, detail=f"{rl.id} {reason}")
                    self._end(rl, reason)
            await anyio.sleep(REAP_PERIOD_S)


# -- the app -------------------------------------------------------------------------------------


@dataclass
class Daemon:
    """What the endpoints share."""

    orch: Orchestrator
    leases: LeaseManager
    spec: DaemonSpec
    token: str | None
    stopping: anyio.Event = field(default_factory=anyio.Event)
    metrics: OrchestratorMetrics | None = None


async def read_json(request: Request, limit_bytes: int) -> dict[str, Any]:
    """The body as a JSON object, at most ``limit_bytes`` long."""
    declared = request.headers.get("content-length")
    too_big = ApiError(
        413,
        f"the request body is larger than daemon.max_body_bytes ({limit_bytes} bytes); send less, "
        "or raise daemon.max_body_bytes in the daemon's config",
        "body_too_large",
    )
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise too_big
    chunks: list[bytes] = []
    n = 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit_bytes:
            raise too_big
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", "invalid_json")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(
            400, f"the request body is not valid JSON ({exc}); send a JSON object", "invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(
            400, f"expected a JSON object, got a JSON {type(data).__name__}; send {{...}}", "invalid_json"
        )
    return data


def _int(v: Any, key: str, *, minimum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{key} must be an integer, got {v!r}", "invalid_request")
    if minimum is not None and v < minimum:
        raise ApiError(400, f"{key} must be at least {minimum}, got {v}", "invalid_request")
    return v


def _seconds(v: Any, key: str, *, allow_none: bool = True) -> float | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise ApiError(
            400,
            f"{key} must be a number of seconds >= 0{' or null' if allow_none else ''}, got {v!r}",
            "invalid_request",
        )
    return float(v)


def _header_number(request: Request, name: str, key: str) -> float | None:
    raw = request.headers.get(name)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ApiError(
            400, f"the {name} header ({key}) must be a number, got {raw!r}", "invalid_request"
        ) from None


def create_app(d: Daemon) -> ASGIApp:
    orch, spec = d.orch, d.spec
    if d.metrics is None:
        d.metrics = OrchestratorMetrics(orch)
    metrics = d.metrics

    def endpoint(
        fn: Callable[[Request], Awaitable[Response | HeldResponse]],
    ) -> Callable[[Request], Awaitable[Any]]:
        async def wrapped(request: Request) -> Any:
            try:
                return await fn(request)
            except Exception as exc:
                return api_error(exc).response()

        return wrapped

    # -- reading ---------------------------------------------------------------------------

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "stopping" if d.stopping.is_set() else "ok"})

    async def status(request: Request) -> Response:
        return JSONResponse(daemon_status(d))

    async def models(request: Request) -> Response:
        ledger = orch.ledger()
        data = []
        for name, s in orch.config.models.items():
            loading = ledger.loading is not None and ledger.loading.model == name
            data.append(
                {
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
            )
        return JSONResponse({"object": "list", "data": data})

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    async def events(request: Request) -> HeldResponse:
        history = request.query_params.get("history", "").lower() in ("1", "true", "yes")
        # follow=0: the recent events, then the end of the response (the timeline command)
        follow = request.query_params.get("follow", "1").lower() not in ("0", "false", "no")
        send_events, receive_events = anyio.create_memory_object_stream[Event](10_000)
        backlog = list(orch.hub.history) if history else []

        def listen(e: Event) -> None:
            try:
                send_events.send_nowait(e)
            except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

        remove = orch.add_listener(listen)  # in the same instant as the backlog: no gap

        async def work(send: Send) -> None:
            try:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"text/event-stream"),
                            (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no"),
                        ],
                    }
                )
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

    # -- remote leases -----------------------------------------------------------------------

    async def open_lease(request: Request) -> HeldResponse:
        body = await read_json(request, spec.max_body_bytes)
        known = {"model", "bytes", "priority", "timeout", "ttl_s", "pid", "holder"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ApiError(
                400,
                f"unknown field(s) {', '.join(unknown)}; use: {', '.join(sorted(known))}",
                "invalid_request",
            )
        model, n_bytes = body.get("model"), body.get("bytes")
        if (model is None) == (n_bytes is None):
            raise ApiError(
                400,
                "give exactly one of model (a configured model, alias or kind) and bytes (raw VRAM for "
                "a program of your own)",
                "invalid_request",
            )
        if model is not None and (not isinstance(model, str) or not model):
            raise ApiError(
                400, f"model must be a model name, alias or kind, got {model!r}", "invalid_request"
            )
        if n_bytes is not None:
            n_bytes = _int(n_bytes, "bytes", minimum=1)
            if n_bytes > orch.config.budget_bytes:
                raise ApiError(
                    400,
                    f"bytes={n_bytes} ({format_gib(n_bytes)}) is more than the whole budget "
                    f"({orch.config.budget_bytes} bytes, {format_gib(orch.config.budget_bytes)}); "
                    "ask for less",
                    "insufficient_vram",
                )
        if model is not None:
            orch.resolve(model)  # 404 at once for an unknown model
        priority = _int(body.get("priority", 0), "priority")
        timeout_s = _seconds(body.get("timeout"), "timeout")
        ttl_s = _seconds(body.get("ttl_s", spec.lease_ttl_s), "ttl_s", allow_none=False)
        assert ttl_s is not None
        if not 0 < ttl_s <= spec.max_lease_ttl_s:
            raise ApiError(
                400,
                f"ttl_s must be more than 0 and at most {spec.max_lease_ttl_s:g} s (daemon.max_lease_ttl_s), "
                f"got {ttl_s:g}; renew the lease more often instead",
                "invalid_request",
            )
        pid = body.get("pid")
        if pid is not None:
            pid = _int(pid, "pid", minimum=1)
        holder = body.get("holder", "")
        if not isinstance(holder, str) or len(holder) > 200:
            raise ApiError(400, "holder must be a string of at most 200 characters", "invalid_request")
        if d.stopping.is_set():
            raise NotRunning()

        async def work(send: Send) -> None:
            rl = await d.leases.open(
                model=model,
                n_bytes=n_bytes,
                priority=priority,
                timeout_s=timeout_s,
                ttl_s=ttl_s,
                pid=pid,
                holder=holder or (request.client.host if request.client else ""),
                # Leases of one named holder (RemoteOrchestrator names each of its tasks) count
                # as one owner: a holder that waits for a model its own lease keeps out is
                # told at once (409), as a task in process is.
                owner=("remote", holder) if holder else None,
            )
            await send_json(send, 200, rl.to_dict())

        return HeldResponse(work, stop=d.stopping)

    async def renew_lease(request: Request) -> Response:
        return JSONResponse(d.leases.renew(request.path_params["lease_id"]).to_dict())

    async def release_lease(request: Request) -> Response:
        rl = await d.leases.release(request.path_params["lease_id"])
        return JSONResponse({**rl.to_dict(), "released": True})

    async def list_leases(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [rl.to_dict() for rl in d.leases.leases()]})

    # -- the gateway -------------------------------------------------------------------------

    def model_of(body: Mapping[str, Any]) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(
                400,
                'the body needs "model": a configured model, alias or kind (GET /v1/models)',
                "invalid_request",
            )
        return model

    def lease_options(request: Request) -> tuple[float | None, int]:
        timeout_s = _header_number(request, "x-vram-timeout", "lease timeout, seconds")
        if timeout_s is None:
            timeout_s = spec.request_timeout_s
        priority = _header_number(request, "x-vram-priority", "priority")
        return timeout_s, int(priority or 0)

    def proxy(path: str) -> Callable[[Request], Awaitable[HeldResponse]]:
        async def handler(request: Request) -> HeldResponse:
            body = await read_json(request, spec.max_body_bytes)
            s = orch.resolve(model_of(body))
            backend = orch.backends[s.name]
            if not isinstance(backend, ServerBackend):
                where = {"sdxl": "/v1/images/generations", "tts": "/v1/audio/speech"}.get(s.kind)
                raise ApiError(
                    400,
                    f"{s.name!r} is a {s.kind} model run in-process ({s.backend} backend), not a server: "
                    + (f"use POST {where}" if where else "configure a server or vllm backend for it"),
                    "invalid_request",
                )
            served = backend.options.served_model or s.name
            timeout_s, priority = lease_options(request)
            streaming = bool(body.get("stream"))
            upstream_body = {**body, "model": served}

            async def work(send: Send) -> None:
                async with orch.acquire(s.name, timeout=timeout_s, priority=priority) as lease:
                    handle = lease.handle
                    assert isinstance(handle, ServerHandle)
                    await _forward(handle.client, path, upstream_body, send, streaming=streaming)

            return HeldResponse(work)

        return handler

    async def images(request: Request) -> HeldResponse:
        body = await read_json(request, spec.max_body_bytes)
        s = orch.resolve(model_of(body) if "model" in body else "sdxl")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, 'the body needs "prompt": the text to draw', "invalid_request")
        n = _int(body.get("n", 1), "n", minimum=1)
        if n > 4:
            raise ApiError(400, f"n must be at most 4, got {n}; make several requests", "invalid_request")
        fmt = body.get("response_format", "b64_json")
        if fmt != "b64_json":
            raise ApiError(400, f"response_format {fmt!r} is not supported; use b64_json", "invalid_request")
        width = height = None
        size = body.get("size")
        if size is not None:
            try:
                w, h = str(size).lower().split("x")
                width, height = int(w), int(h)
                if not (64 <= width <= 4096 and 64 <= height <= 4096):
                    raise ValueError
            except ValueError:
                raise ApiError(
                    400, f"size must be WIDTHxHEIGHT (64-4096), got {size!r}", "invalid_request"
                ) from None
        steps = body.get("steps")
        steps = None if steps is None else _int(steps, "steps", minimum=1)
        seed = body.get("seed")
        seed = None if seed is None else _int(seed, "seed", minimum=0)
        media = _media()
        timeout_s, priority = lease_options(request)

        async def work(send: Send) -> None:
            import base64

            out = []
            async with orch.acquire(s.name, timeout=timeout_s, priority=priority) as lease:
                for i in range(n):
                    png = await _run_media(
                        media,
                        media.generate_image(
                            lease.handle,
                            prompt,
                            width=width,
                            height=height,
                            steps=steps,
                            seed=None if seed is None else seed + i,
                        ),
                    )
                    out.append({"b64_json": base64.b64encode(png).decode()})
            await send_json(send, 200, {"created": int(time.time()), "model": s.name, "data": out})

        return HeldResponse(work)

    async def speech(request: Request) -> HeldResponse:
        body = await read_json(request, spec.max_body_bytes)
        s = orch.resolve(model_of(body) if "model" in body else "tts")
        text = body.get("input")
        if not isinstance(text, str) or not text:
            raise ApiError(400, 'the body needs "input": the text to speak', "invalid_request")
        fmt = body.get("response_format", "wav")
        if fmt != "wav":
            raise ApiError(400, f"response_format {fmt!r} is not supported; use wav", "invalid_request")
        media = _media()
        timeout_s, priority = lease_options(request)

        async def work(send: Send) -> None:
            async with orch.acquire(s.name, timeout=timeout_s, priority=priority) as lease:
                wav = await _run_media(media, media.synthesize_speech(lease.handle, text))
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"audio/wav"), (b"content-length", str(len(wav)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": wav})

        return HeldResponse(work)

    routes = [
        Route("/health", endpoint(health), methods=["GET"]),
        Route("/v1/status", endpoint(status), methods=["GET"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/metrics", endpoint(prometheus), methods=["GET"]),
        Route("/v1/events", endpoint(events), methods=["GET"]),
        Route("/v1/leases", endpoint(open_lease), methods=["POST"]),
        Route("/v1/leases", endpoint(list_leases), methods=["GET"]),
        Route("/v1/leases/{lease_id}/renew", endpoint(renew_lease), methods=["POST"]),
        Route("/v1/leases/{lease_id}", endpoint(release_lease), methods=["DELETE"]),
        Route("/v1/chat/completions", endpoint(proxy("/v1/chat/completions")), methods=["POST"]),
        Route("/v1/completions", endpoint(proxy("/v1/completions")), methods=["POST"]),
        Route("/v1/images/generations", endpoint(images), methods=["POST"]),
        Route("/v1/audio/speech", endpoint(speech), methods=["POST"]),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        what = "method not allowed here" if code == 405 else "no such endpoint"
        return ApiError(
            code,
            f"{request.method} {request.url.path}: {what}; see the daemon's endpoints in the README",
            "not_found" if code == 404 else "method_not_allowed",
        ).response()

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    return _Auth(app, d.token)


def _sse(e: Event) -> bytes:
    return f"event: {e.kind}\ndata: {json.dumps(e.to_dict())}\n\n".encode()


async def _forward(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], send: Send, *, streaming: bool
) -> None:
    """Proxy one request to the model's server and its answer (streamed as it comes) back."""
    request = client.build_request("POST", path, json=body)
    try:
        upstream = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise ApiError(
            502,
            f"the model's server failed the request ({type(exc).__name__}: {exc}); retry: the next "
            "request restarts it if it crashed",
            "upstream_error",
        ) from None
    try:
        content_type = upstream.headers.get("content-type", "application/json")
        if not streaming or upstream.status_code != 200:
            try:
                data = await upstream.aread()
            except httpx.HTTPError as exc:
                raise ApiError(
                    502,
                    f"the model's server broke off its answer ({type(exc).__name__}: {exc}); retry",
                    "upstream_error",
                ) from None
            await send(
                {
                    "type": "http.response.start",
                    "status": upstream.status_code,
                    "headers": [
                        (b"content-type", content_type.encode()),
                        (b"content-length", str(len(data)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": data})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", content_type.encode()), (b"cache-control", b"no-cache")],
            }
        )
        try:
            async for chunk in upstream.aiter_bytes():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:
            err = {
                "error": {
                    "message": f"the model's server broke off the stream ({exc}); retry",
                    "type": "upstream_error",
                    "code": 502,
                }
            }
            await send(
                {
                    "type": "http.response.body",
                    "body": f"data: {json.dumps(err)}\n\n".encode(),
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b""})
    finally:
        with anyio.CancelScope(shield=True):
            await upstream.aclose()


def _media() -> Any:
    try:
        from orchestrator import media
    except ImportError as exc:
        raise ApiError(
            501,
            f"in-process image and speech models are not available in this installation ({exc})",
            "not_implemented",
        ) from None
    return media


async def _run_media(media: Any, coro: Awaitable[bytes]) -> bytes:
    try:
        return await coro
    except media.MediaUnsupported as exc:
        raise ApiError(501, str(exc), "not_implemented") from None


class _Auth:
    """Bearer-token check in front of the app (``/health`` stays open: it tells nothing)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.token is None or scope.get("path") == "/health":
            await self.app(scope, receive, send)
            return
        given = b""
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                given = v
        expected = b"Bearer " + self.token.encode()
        if not hmac.compare_digest(given, expected):
            why = "no bearer token" if not given else "a wrong bearer token"
            await send_json(
                send,
                401,
                {
                    "error": {
                        "message": f"the request has {why}; send 'Authorization: Bearer <token>' with the "
                        "daemon's token (daemon.token or VRAM_ORCHESTRATOR_TOKEN)",
                        "type": "unauthorized",
                        "code": 401,
                    }
                },
                {"www-authenticate": "Bearer"},
            )
            return
        await self.app(scope, receive, send)


def daemon_status(d: Daemon) -> dict[str, Any]:
    """``status_report`` plus what only a running daemon has: leases and reservations."""
    report = status_report(d.orch)
    report["running"] = True
    report["stopping"] = d.stopping.is_set()
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


# -- running -------------------------------------------------------------------------------------


def resolve_token(config: Config, host: str, token: str | None) -> str | None:
    """The token to require: the argument, else the environment, else the config. Binding to a
    non-loopback address without one is refused."""
    import os

    token = token or os.environ.get(TOKEN_ENV) or config.daemon.token
    if not is_loopback(host) and not token:
        raise OrchestratorError(
            f"binding to {host} (not loopback) needs a bearer token: set daemon.token in the config, "
            f"or {TOKEN_ENV}, or pass --token; or bind to 127.0.0.1"
        )
    return token


class _Server:
    """uvicorn's server, told about SIGTERM/SIGINT so that streams end at once, and not
    re-raising the signal after its graceful shutdown (the daemon exits 0 by itself)."""

    def __init__(
        self, app: ASGIApp, host: str, port: int, grace_s: float, on_exit: Callable[[], None]
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
            host=host,
            port=port,
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=max(1, math.ceil(grace_s)),
            server_header=False,
        )
        self.server = Server(config)

    def bound_port(self) -> int | None:
        for s in getattr(self.server, "servers", []):
            for sock in s.sockets:
                return int(sock.getsockname()[1])
        return None


async def serve(
    config: Config,
    *,
    host: str | None = None,
    port: int | None = None,
    token: str | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run the daemon until SIGTERM/SIGINT; then stop cleanly (see the module docstring)."""
    spec = config.daemon
    host = host or spec.host
    port = spec.port if port is None else port
    token = resolve_token(config, host, token)
    loop = asyncio.get_running_loop()
    orch = Orchestrator(config)
    async with orch, LeaseManager(orch, spec) as leases:
        d = Daemon(orch, leases, spec, token)
        app = create_app(d)

        def on_exit() -> None:
            loop.call_soon_threadsafe(d.stopping.set)

        server = _Server(app, host, port, spec.grace_s, on_exit)

        async def announce() -> None:
            while not server.server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
                await anyio.sleep(0.01)
            bound = server.bound_port() or port
            shown = f"[{host}]" if ":" in host else host
            url = f"http://{shown}:{bound}"
            if on_ready is not None:
                on_ready(url)

        async with anyio.create_task_group() as tg:
            tg.start_soon(announce)
            await server.server.serve()
            tg.cancel_scope.cancel()
        d.stopping.set()
        logger.info("stopping: cancelling %d remote lease(s) and unloading", len(leases.leases()))
