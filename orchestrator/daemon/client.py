"""``RemoteOrchestrator``: the in-process API's shape, against a running daemon.

::

    remote = RemoteOrchestrator("http://127.0.0.1:8470", token=None)
    async with remote.acquire("sdxl", timeout=60, priority=1) as lease:
        ...                                    # lease.url: the model's server, when it has one
    async with remote.reserve(4 * 2**30, pid=os.getpid()) as lease:
        ...                                    # 4 GiB of VRAM for this program's own use

While a lease is held, it is renewed in the background (every third of its ttl); it is
released when the block ends, also when the block is cancelled. A lease the daemon no longer
knows (it expired, its model crashed, the daemon restarted) cancels the block and raises
``LeaseLost`` from it.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from orchestrator.errors import OrchestratorError

RENEW_FRACTION = 1 / 3  # renew when this much of the ttl has passed
RELEASE_TIMEOUT_S = 5.0


class RemoteError(OrchestratorError):
    """The daemon answered with an error: ``status``, ``type`` and its message."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        self.status, self.type, self.message = status, type_, message
        super().__init__(f"{message} (HTTP {status}, {type_})")


class LeaseLost(RemoteError):
    """The daemon ended the lease while it was held (expired, model crashed, daemon stopped)."""


class DaemonUnreachable(OrchestratorError):
    def __init__(self, url: str, exc: Exception) -> None:
        self.url = url
        super().__init__(
            f"cannot reach the daemon at {url} ({type(exc).__name__}: {exc}); start it with "
            "`vram-orchestrator serve --config FILE`, or check --url"
        )


@dataclass(frozen=True)
class RemoteLease:
    """A granted remote lease."""

    id: str
    model: str
    kind: str
    vram_bytes: int
    url: str | None  # the model's server, for server models
    ttl_s: float
    waited_s: float
    expires_at: float | None  # wall-clock time (time.time()) when it expires unless renewed
    gpus: tuple[int, ...] = ()  # the card(s) that serve it (the daemon's card indexes)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RemoteLease:
        return cls(
            id=str(d["id"]),
            model=str(d["model"]),
            kind=str(d["kind"]),
            vram_bytes=int(d["bytes"]),
            url=d.get("url"),
            ttl_s=float(d["ttl_s"]),
            waited_s=float(d.get("waited_s") or 0.0),
            expires_at=d.get("expires_at"),
            gpus=tuple(int(g) for g in d.get("gpus") or ()),
        )


def _raise_for(r: httpx.Response, cls: type[RemoteError] = RemoteError) -> None:
    if r.status_code < 400:
        return
    try:
        err = r.json()["error"]
        message, type_ = str(err["message"]), str(err.get("type", "error"))
    except (ValueError, KeyError, TypeError):
        message, type_ = r.text[:500] or r.reason_phrase, "error"
    raise cls(r.status_code, type_, message)


class RemoteOrchestrator:
    """A client of ``vram-orchestrator serve``. Use it as an async context manager, or call
    ``aclose()`` when done (it owns one HTTP connection pool)."""

    def __init__(self, url: str, token: str | None = None, *, http_timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        token = token if token is not None else os.environ.get("VRAM_ORCHESTRATOR_TOKEN")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._timeout = httpx.Timeout(http_timeout_s)
        self._client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=self._timeout)
        self._holder_prefix = f"{socket.gethostname()}:pid-{os.getpid()}:{uuid.uuid4().hex[:8]}"

    async def __aenter__(self) -> RemoteOrchestrator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return await self._client.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise DaemonUnreachable(self.url, exc) from exc

    # -- reading -----------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """What ``vram-orchestrator status --json`` prints, from the running daemon."""
        r = await self._request("GET", "/v1/status")
        _raise_for(r)
        return dict(r.json())

    async def models(self) -> list[dict[str, Any]]:
        """The configured models with their tier and bytes."""
        r = await self._request("GET", "/v1/models")
        _raise_for(r)
        return list(r.json()["data"])

    async def events(self, *, history: bool = False) -> AsyncIterator[dict[str, Any]]:
        """The daemon's events as they happen (``history``: the recent ones first)."""
        params = {"history": "1"} if history else {}
        try:
            async with self._client.stream("GET", "/v1/events", params=params, timeout=None) as r:
                if r.status_code >= 400:
                    await r.aread()
                    _raise_for(r)
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        yield json.loads(line[6:])
        except httpx.TransportError as exc:
            raise DaemonUnreachable(self.url, exc) from exc

    # -- leases ------------------------------------------------------------------------------

    @asynccontextmanager
    async def acquire(
        self,
        name_or_kind: str,
        *,
        timeout: float | None = None,
        priority: int = 0,
        ttl_s: float | None = None,
    ) -> AsyncIterator[RemoteLease]:
        """Hold a lease on a model for the block (waits for it like ``Orchestrator.acquire``)."""
        async with self._lease({"model": name_or_kind}, timeout, priority, ttl_s) as lease:
            yield lease

    @asynccontextmanager
    async def reserve(
        self,
        n_bytes: int,
        *,
        timeout: float | None = None,
        priority: int = 0,
        ttl_s: float | None = None,
        pid: int | None = None,
    ) -> AsyncIterator[RemoteLease]:
        """Reserve ``n_bytes`` of VRAM for this program's own use for the block: the daemon
        evicts its models to make room. ``pid``: the process whose use the daemon checks."""
        async with self._lease({"bytes": n_bytes, "pid": pid}, timeout, priority, ttl_s) as lease:
            yield lease

    @asynccontextmanager
    async def _lease(
        self, what: dict[str, Any], timeout: float | None, priority: int, ttl_s: float | None
    ) -> AsyncIterator[RemoteLease]:
        # This task's own name: the daemon tells it at once (409, LeaseDeadlock's message) when
        # it waits for a model that one of its own leases keeps out, as acquire() does in process.
        holder = f"{self._holder_prefix}:task-{anyio.get_current_task().id}"
        body = {**what, "priority": priority, "timeout": timeout, "holder": holder}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        wait = httpx.Timeout(self._timeout.connect, read=None if timeout is None else timeout + 30.0)
        r = await self._request("POST", "/v1/leases", json=body, timeout=wait)
        _raise_for(r)
        lease = RemoteLease.from_dict(r.json())
        lost: list[RemoteError] = []
        try:
            async with anyio.create_task_group() as tg:

                async def renew() -> None:
                    while True:
                        await anyio.sleep(lease.ttl_s * RENEW_FRACTION)
                        try:
                            rr = await self._request("POST", f"/v1/leases/{lease.id}/renew")
                        except DaemonUnreachable:
                            continue  # try again: the ttl leaves room for two more tries
                        if rr.status_code in (404, 410):
                            try:
                                _raise_for(rr, LeaseLost)
                            except LeaseLost as exc:
                                lost.append(exc)
                            tg.cancel_scope.cancel()
                            return
                        _raise_for(rr)

                tg.start_soon(renew)
                try:
                    yield lease
                finally:
                    tg.cancel_scope.cancel()
        finally:
            if not lost:
                with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_TIMEOUT_S):
                    try:
                        await self._client.delete(f"/v1/leases/{lease.id}")
                    except httpx.HTTPError:
                        pass  # the daemon is gone, or the ttl reclaims it
        if lost:
            raise lost[0]


def fetch_status(url: str, token: str | None = None, *, timeout_s: float = 10.0) -> dict[str, Any]:
    """``GET /v1/status`` from a daemon, synchronously (the CLI's ``status --url``)."""
    token = token if token is not None else os.environ.get("VRAM_ORCHESTRATOR_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.get(url.rstrip("/") + "/v1/status", headers=headers, timeout=timeout_s)
    except httpx.TransportError as exc:
        raise DaemonUnreachable(url, exc) from exc
    _raise_for(r)
    return dict(r.json())


def fetch_events(url: str, token: str | None = None, *, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """The daemon's recent events (its history), synchronously (the CLI's ``timeline --url``)."""
    token = token if token is not None else os.environ.get("VRAM_ORCHESTRATOR_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    out: list[dict[str, Any]] = []
    try:
        with httpx.stream(
            "GET",
            url.rstrip("/") + "/v1/events",
            params={"history": "1", "follow": "0"},
            headers=headers,
            timeout=timeout_s,
        ) as r:
            if r.status_code >= 400:
                r.read()
                _raise_for(r)
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out.append(json.loads(line[6:]))
    except httpx.TransportError as exc:
        raise DaemonUnreachable(url, exc) from exc
    return out
