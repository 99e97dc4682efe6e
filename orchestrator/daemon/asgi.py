"""The daemon's ASGI plumbing: a response that holds its lease in the request's own task
(``HeldResponse``), the body reader with its size limit and deadline, and the bearer check."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable

import anyio
from starlette.requests import Request

from orchestrator.daemon.errors import (
    ApiError,
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    api_error,
    send_error,
    send_json,
    shutting_down,
)
from orchestrator.daemon.requests import bearer_token
from orchestrator.errors import OrchestratorError

logger = logging.getLogger("orchestrator.daemon")


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


class Stopper:
    """The daemon's stop: an event for whoever asks (``is_set``, ``wait``), and for the work in
    flight a deadline on its cancel scope, ``grace_s`` after the stop (no task per request)."""

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._held: dict[anyio.CancelScope, float] = {}

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()

    def set(self) -> None:
        """Stop (call it in the event loop's thread)."""
        if self._event.is_set():
            return
        self._event.set()
        for scope, grace_s in list(self._held.items()):
            self._apply(scope, grace_s)

    def hold(self, scope: anyio.CancelScope, grace_s: float) -> None:
        self._held[scope] = grace_s
        if self._event.is_set():
            self._apply(scope, grace_s)

    def drop(self, scope: anyio.CancelScope) -> None:
        self._held.pop(scope, None)

    @staticmethod
    def _apply(scope: anyio.CancelScope, grace_s: float) -> None:
        if grace_s <= 0:
            scope.cancel()
        else:
            scope.deadline = min(scope.deadline, anyio.current_time() + grace_s)


class HeldResponse:
    """An ASGI response that does all its work in the request's own task, so that a lease
    taken in it is released in the task that took it: ``work(send)`` runs until it has sent
    its response, and is cancelled the moment the client disconnects, or, once ``stop`` is
    set (the daemon is stopping), after ``grace_s`` more. Work cancelled before it answered
    gets the JSON error shape (503 ``shutting_down``); a stream is ended properly."""

    def __init__(
        self,
        work: Callable[[Send], Awaitable[None]],
        *,
        stop: Stopper | None = None,
        grace_s: float = 0.0,
    ) -> None:
        self.work = work
        self.stop = stop
        self.grace_s = grace_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracked = _Started(send)
        held = anyio.CancelScope()
        disconnected = False

        async def watch_disconnect() -> None:
            nonlocal disconnected
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except Exception:  # the server's receive broke: the work goes on undisturbed
                logger.exception("watching for the client's disconnect failed")
                return
            disconnected = True
            held.cancel()

        # The watcher is a bare asyncio task (the daemon runs on asyncio, as uvicorn does), not
        # a task group's: a task group, its task and cancelling it at the end cost about 50 us
        # per request, a good part of a proxied request's CPU.
        watcher = asyncio.get_running_loop().create_task(watch_disconnect())
        try:
            with held:
                if self.stop is not None:
                    self.stop.hold(held, self.grace_s)
                try:
                    await self.work(tracked)
                except Exception as exc:
                    err = api_error(exc)
                    if err.status >= 500 and not isinstance(exc, OrchestratorError | ApiError):
                        logger.exception("request failed")
                    if not tracked.started:
                        await send_error(tracked, err)  # (tracked: answered, nothing more to send)
                finally:
                    if self.stop is not None:
                        self.stop.drop(held)
        finally:
            watcher.cancel()
        if not disconnected and tracked.started and not tracked.finished:
            # Stopped mid-stream (the daemon is shutting down): end the body properly.
            await send({"type": "http.response.body", "body": b""})
        elif not disconnected and not tracked.started:
            await send_error(send, shutting_down())


async def read_body(request: Request, limit_bytes: int, timeout_s: float) -> bytes:
    """The raw body: at most ``limit_bytes`` (413), all of it within ``timeout_s`` (408)."""
    return await read_asgi_body(request.scope, request.receive, limit_bytes, timeout_s)


async def read_asgi_body(scope: Scope, receive: Receive, limit_bytes: int, timeout_s: float) -> bytes:
    """``read_body`` straight from the ASGI messages (no ``Request`` needed)."""
    declared = None
    for k, v in scope["headers"]:
        if k == b"content-length":
            declared = v.decode("latin-1")

    def too_big() -> ApiError:
        return ApiError(
            413,
            f"the request body is larger than daemon.max_body_bytes ({limit_bytes} bytes); send less, "
            "or raise daemon.max_body_bytes in the daemon's config",
            "body_too_large",
        )

    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise too_big()
    chunks: list[bytes] = []
    n = 0
    # The deadline is a timer that cancels the scope: a scope's own deadline costs about three
    # times as much, and the body has nearly always come with the headers.
    deadline = anyio.CancelScope()
    timer = asyncio.get_running_loop().call_later(timeout_s, deadline.cancel)
    try:
        with deadline:
            while True:
                message = await receive()
                if message["type"] != "http.request":  # http.disconnect
                    raise ApiError(
                        400, "the client went away before it sent the whole body", "client_disconnected"
                    )
                chunk = message.get("body", b"")
                n += len(chunk)
                if n > limit_bytes:
                    raise too_big()
                if chunk:
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    finally:
        timer.cancel()
    if deadline.cancelled_caught:
        told = f" of the {declared} its Content-Length declared" if declared is not None else ""
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout_s:g} s ({n} bytes came{told}); send the "
            "whole body at once",
            "body_timeout",
        )
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class Auth:
    """Bearer-token check in front of the app (``/health`` stays open: it tells nothing). The
    scheme is case-insensitive (RFC 9110 11.1), the token is compared in constant time."""

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
        token = bearer_token(given)
        if token is None or not hmac.compare_digest(token, self.token.encode()):
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
