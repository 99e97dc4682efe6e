"""The OpenAI-compatible gateway: completions proxied to the model's server (streaming
included), images and speech from in-process models (``orchestrator.media``).

Each request holds a lease for exactly its own duration: until its response (or stream)
ends, at once when its client disconnects, when its work runs past its deadline
(``daemon.request_timeout_s``), or ``daemon.grace_s`` after the daemon begins to stop.
Everything a request asks for is parsed and checked before anything loads: its model exists
and has the kind the endpoint serves, and its inputs are within the model's limits
(``models.<name>.limits``).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
from starlette.datastructures import Headers
from starlette.requests import Request

from orchestrator.daemon.asgi import HeldResponse, read_asgi_body, read_body
from orchestrator.daemon.errors import ApiError, ASGIApp, Receive, Scope, Send, api_error, dumps, send_json
from orchestrator.daemon.requests import (
    check_image_limits,
    check_speech_limits,
    completion_limits,
    lease_options,
    model_of,
    parse_image,
    parse_json,
    parse_speech,
)
from orchestrator.daemon.state import Daemon
from orchestrator.daemon.upstream import UPSTREAM_ERRORS, Connection, Upstream
from orchestrator.spec import ModelSpec


async def read_json(d: Daemon, request: Request) -> dict[str, Any]:
    return parse_json(await read_body(request, d.spec.max_body_bytes, d.body_timeout_s))


@contextmanager
def work_deadline(d: Daemon) -> Iterator[None]:
    """The request's work (after its grant) under the daemon's deadline: 504 past it."""
    deadline_s = d.work_deadline_s
    try:
        with anyio.fail_after(deadline_s):
            yield
    except TimeoutError:
        raise ApiError(
            504,
            f"the request's work ran past its deadline of {deadline_s:g} s (daemon.request_timeout_s) "
            "and was stopped; ask for less work, or raise daemon.request_timeout_s",
            "timeout",
        ) from None


# -- completions -------------------------------------------------------------------------------


def _served_name(d: Daemon, s: ModelSpec) -> str | None:
    """The name the model's server knows it by; ``None`` when the model runs in-process."""
    return d.orch.backends[s.name].served_model


def proxy(d: Daemon, path: str) -> Callable[[Request], Awaitable[HeldResponse]]:
    """The completions route's handler (``path``), for Starlette's router."""
    handler = _proxy(d, path)

    async def routed(request: Request) -> HeldResponse:
        return await handler(request.scope, request.receive)

    return routed


def _proxy(d: Daemon, path: str) -> Callable[[Scope, Receive], Awaitable[HeldResponse]]:
    async def handler(scope: Scope, receive: Receive) -> HeldResponse:
        raw = await read_asgi_body(scope, receive, d.spec.max_body_bytes, d.body_timeout_s)
        body = parse_json(raw)
        s = d.orch.resolve(model_of(body))
        served = _served_name(d, s)
        if served is None:
            where = {"sdxl": "/v1/images/generations", "tts": "/v1/audio/speech"}.get(s.kind)
            raise ApiError(
                400,
                f"{s.name!r} is a {s.kind} model run in-process ({s.backend} backend), not a server: "
                + (f"use POST {where}" if where else "configure a server or vllm backend for it"),
                "invalid_request",
            )
        changes = completion_limits(body, s.limits, s.name)
        if body.get("model") == served and not changes:
            upstream_body = raw  # as it came: nothing to change
        else:
            upstream_body = dumps({**body, "model": served, **changes})
        opts = lease_options(Headers(scope=scope), d.spec.request_timeout_s)
        streaming = bool(body.get("stream"))

        async def work(send: Send) -> None:
            async with d.orch.acquire(s.name, timeout=opts.timeout_s, priority=opts.priority) as lease:
                base_url = getattr(lease.handle, "base_url", None)  # a server's handle: where it is
                assert isinstance(base_url, str), f"{s.name} is served without a base URL"
                up = await d.upstreams.get(s.name, base_url, s.max_concurrent)
                await forward(up, path, upstream_body, send, streaming=streaming)

        return HeldResponse(work, stop=d.stopping, grace_s=d.in_flight_grace_s)

    return handler


def proxy_app(d: Daemon, path: str) -> ASGIApp:
    """``proxy(d, path)`` as a bare ASGI app, for the hot path: ``POST`` to a completions
    route reaches it without the router and the middlewares (``app.FastRoutes``), and without
    a ``Request``; its errors get the JSON shape as through ``app.endpoint``."""
    handler = _proxy(d, path)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response: ASGIApp = await handler(scope, receive)
        except Exception as exc:
            response = api_error(exc).response()
        await response(scope, receive, send)

    return app


def _upstream_failed(what: str, exc: Exception, hint: str = "retry") -> ApiError:
    return ApiError(502, f"the model's server {what} ({type(exc).__name__}: {exc}); {hint}", "upstream_error")


def _content_type(headers: list[tuple[bytes, bytes]]) -> bytes:
    for k, v in headers:
        if k == b"content-type":
            return v
    return b"application/json"


async def forward(up: Upstream, path: str, body: bytes, send: Send, *, streaming: bool) -> None:
    """Proxy one request to the model's server and its answer (streamed as it comes) back."""
    try:
        async with up.request(path, body) as answer:
            await _answer(answer, send, streaming=streaming)
    except UPSTREAM_ERRORS as exc:  # raised while the request was sent, before any answer
        raise _upstream_failed(
            "failed the request", exc, "retry: the next request restarts it if it crashed"
        ) from None


async def _answer(answer: Connection, send: Send, *, streaming: bool) -> None:
    content_type = _content_type(answer.headers)
    if not streaming or answer.status != 200:
        try:
            data = await answer.read()
        except UPSTREAM_ERRORS as exc:
            raise _upstream_failed("broke off its answer", exc) from None
        out = [(b"content-type", content_type), (b"content-length", b"%d" % len(data))]
        await send({"type": "http.response.start", "status": answer.status, "headers": out})
        await send({"type": "http.response.body", "body": data, "more_body": False})
        return
    out = [(b"content-type", content_type), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": out})
    try:
        # What one read from the server brought goes on as one piece (chunks that came
        # together are written together); the last piece ends the body (no write of its own).
        while chunk := await answer.next_chunk():
            last = answer.ended
            await send({"type": "http.response.body", "body": chunk, "more_body": not last})
            if last:
                return
    except UPSTREAM_ERRORS as exc:
        err = {
            "error": {
                "message": f"the model's server broke off the stream ({exc}); retry",
                "type": "upstream_error",
                "code": 502,
            }
        }
        chunk = f"data: {json.dumps(err)}\n\n".encode()
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


# -- images and speech -------------------------------------------------------------------------


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


def check_kind(s: ModelSpec, *, kind: str, backend: str, endpoint: str, what: str) -> None:
    """A model the endpoint cannot serve is refused before anything loads (400, not a 501
    after loading it)."""
    if s.kind == kind or s.backend == backend:
        return
    raise ApiError(
        400,
        f"{s.name!r} is a {s.kind} model ({s.backend} backend): it makes no {what}; POST {endpoint} "
        f"serves {kind} models (kind: {kind} or backend: {backend})",
        "invalid_request",
    )


def images(d: Daemon) -> Callable[[Request], Awaitable[HeldResponse]]:
    async def handler(request: Request) -> HeldResponse:
        req = parse_image(await read_json(d, request))
        s = d.orch.resolve(req.model)
        check_kind(s, kind="sdxl", backend="diffusers", endpoint="/v1/images/generations", what="images")
        check_image_limits(req, s.limits, s.name)
        media = _media()
        opts = lease_options(request.headers, d.spec.request_timeout_s)

        async def work(send: Send) -> None:
            cancel = threading.Event()
            out = []
            async with d.orch.acquire(s.name, timeout=opts.timeout_s, priority=opts.priority) as lease:
                with work_deadline(d):
                    for i in range(req.n):
                        png = await _run_media(
                            media,
                            media.generate_image(
                                lease.handle,
                                req.prompt,
                                width=req.width,
                                height=req.height,
                                steps=req.steps,
                                seed=None if req.seed is None else req.seed + i,
                                cancel=cancel,
                            ),
                        )
                        out.append({"b64_json": base64.b64encode(png).decode()})
            await send_json(send, 200, {"created": int(time.time()), "model": s.name, "data": out})

        return HeldResponse(work, stop=d.stopping, grace_s=d.in_flight_grace_s)

    return handler


def speech(d: Daemon) -> Callable[[Request], Awaitable[HeldResponse]]:
    async def handler(request: Request) -> HeldResponse:
        req = parse_speech(await read_json(d, request))
        s = d.orch.resolve(req.model)
        check_kind(s, kind="tts", backend="tts", endpoint="/v1/audio/speech", what="speech")
        check_speech_limits(req, s.limits, s.name)
        media = _media()
        opts = lease_options(request.headers, d.spec.request_timeout_s)

        async def work(send: Send) -> None:
            cancel = threading.Event()
            async with d.orch.acquire(s.name, timeout=opts.timeout_s, priority=opts.priority) as lease:
                with work_deadline(d):
                    wav = await _run_media(
                        media, media.synthesize_speech(lease.handle, req.input, cancel=cancel)
                    )
            headers = [(b"content-type", b"audio/wav"), (b"content-length", str(len(wav)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": wav})

        return HeldResponse(work, stop=d.stopping, grace_s=d.in_flight_grace_s)

    return handler
