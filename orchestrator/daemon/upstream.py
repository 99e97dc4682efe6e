"""The gateway's connections to the models' servers: one keep-alive pool per model, sized to
what the model serves at once (``models.<name>.max_concurrent``), over ``httpcore``'s
HTTP/1.1 connections directly.

httpx's client (what a lease's handle carries, for programs that talk to the server) adds
a request and a response object, header and URL merging, event hooks and content decoding
on top of httpcore; the proxy needs none of that: it sends bytes and passes bytes back. And
httpcore's own pool looks at every connection it holds on every request (is each still
open?), which grows with the pool; here a request takes the most recently used idle
connection, checks only that one, and gives it back when its answer has been read. The
model's lease already bounds how many requests are in flight (``max_concurrent``), so the
pool needs no wait of its own: it keeps at most ``size`` idle connections.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import anyio
import httpcore

# A model without max_concurrent (no limit): as many connections as httpx's default pool.
UNLIMITED_POOL = 100
KEEPALIVE_S = 60.0  # an idle connection older than this is closed instead of reused

# What a failing upstream raises (a refused or reset connection, a broken answer).
UPSTREAM_ERRORS: tuple[type[Exception], ...] = (
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.TimeoutException,
    httpcore.UnsupportedProtocol,
    OSError,
)


class Upstream:
    """One model's server: its base URL and a pool of keep-alive connections to it."""

    def __init__(self, base_url: str, size: int) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"a model server's base URL must be http(s)://host[:port], got {base_url!r}")
        self.base_url = base_url
        self.size = size
        self.scheme = parts.scheme.encode()
        self.host = parts.hostname.encode()
        self.port = parts.port
        self.prefix = parts.path.rstrip("/").encode()
        self.host_header = parts.netloc.encode()
        default_port = 443 if parts.scheme == "https" else 80
        self._origin = httpcore.Origin(self.scheme, self.host, self.port or default_port)
        self._idle: list[httpcore.AsyncHTTPConnection] = []
        self._closed = False

    def url(self, path: str) -> httpcore.URL:
        target = self.prefix + path.encode()
        return httpcore.URL(scheme=self.scheme, host=self.host, port=self.port, target=target)

    def _take(self) -> tuple[httpcore.AsyncHTTPConnection, list[httpcore.AsyncHTTPConnection]]:
        """An idle connection that is still open (the newest first), else a new one; and the
        expired ones passed over (to be closed)."""
        stale: list[httpcore.AsyncHTTPConnection] = []
        while self._idle:
            conn = self._idle.pop()
            if not conn.has_expired():
                return conn, stale
            stale.append(conn)
        return httpcore.AsyncHTTPConnection(self._origin, keepalive_expiry=KEEPALIVE_S), stale

    @asynccontextmanager
    async def request(self, request: httpcore.Request) -> AsyncIterator[httpcore.Response]:
        """Send ``request`` on a pooled connection; the response's body is read in the block,
        and the connection goes back to the pool when it is read to its end."""
        conn, stale = self._take()
        for old in stale:
            await _close(old)
        try:
            response = await conn.handle_async_request(request)
            try:
                yield response
            finally:
                with anyio.CancelScope(shield=True):
                    await response.aclose()
        finally:
            if not self._closed and conn.is_idle() and not conn.has_expired() and len(self._idle) < self.size:
                self._idle.append(conn)
            else:
                await _close(conn)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await _close(conn)


async def _close(conn: httpcore.AsyncHTTPConnection) -> None:
    with anyio.CancelScope(shield=True):
        try:
            await conn.aclose()
        except UPSTREAM_ERRORS:
            pass  # a connection that cannot even close cleanly is gone anyway


class Upstreams:
    """The pools of every model the gateway proxies to, made on first use and replaced when
    the model's server moves (restarted on another port)."""

    def __init__(self) -> None:
        self._by_model: dict[str, Upstream] = {}

    async def get(self, model: str, base_url: str, max_concurrent: int | None) -> Upstream:
        up = self._by_model.get(model)
        if up is not None and up.base_url == base_url:
            return up
        self._by_model[model] = new = Upstream(base_url, max_concurrent or UNLIMITED_POOL)
        if up is not None:
            await up.aclose()  # the server it led to is gone (no lease can be on it)
        return new

    async def aclose(self) -> None:
        ups, self._by_model = list(self._by_model.values()), {}
        for up in ups:
            await up.aclose()
