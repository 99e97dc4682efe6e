"""The daemon's error answers: OpenAI's shape, ``{"error": {"message", "type", "code"}}``, and
the HTTP status each orchestrator error maps to.

Every message says what is wrong and what to do. Bodies are written with ``ensure_ascii``, so
an answer never fails to encode whatever a client sent (a lone surrogate echoed in a message
comes back as its ``\\ud800`` escape).
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from starlette.responses import Response

from orchestrator.errors import (
    AcquireTimeout,
    BackendCrashed,
    BackendError,
    LeaseDeadlock,
    NotRunning,
    OrchestratorError,
    UnknownModel,
)
from states.errors import InsufficientVRAM

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def dumps(body: Any) -> bytes:
    """JSON bytes that always encode (non-ASCII and lone surrogates as escapes)."""
    return json.dumps(body, ensure_ascii=True).encode("ascii")


class JSON(Response):
    """A JSON response written by ``dumps`` (Starlette's own encodes to UTF-8 and fails on a
    lone surrogate)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


class ApiError(Exception):
    """An answer with an error status: ``message`` says what is wrong and what to do."""

    def __init__(self, status: int, message: str, type_: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.retry_after_s = status, message, type_, retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.status}}

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(math.ceil(self.retry_after_s))} if self.retry_after_s is not None else {}

    def response(self) -> Response:
        return JSON(self.body(), status_code=self.status, headers=self.headers())


class LeaseGone(ApiError):
    """A renew or release of a lease this daemon does not hold (ended, or never issued)."""


def invalid(message: str, type_: str = "invalid_request") -> ApiError:
    return ApiError(400, message, type_)


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
        return shutting_down()
    if isinstance(exc, OrchestratorError | ValueError):
        return ApiError(400, str(exc), "invalid_request")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


def shutting_down() -> ApiError:
    return ApiError(503, "the daemon is shutting down; retry against its next start", "shutting_down")


async def send_json(send: Send, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
    data = dumps(body)
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": data})


async def send_error(send: Send, err: ApiError) -> None:
    await send_json(send, err.status, err.body(), err.headers())
