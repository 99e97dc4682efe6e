"""The gateway's connections to the models' servers: one keep-alive pool per model, sized to
what the model serves at once (``models.<name>.max_concurrent``), over ``httpcore`` directly.

httpx's client (what a lease's handle carries, for programs that talk to the server) adds
a request and a response object, header and URL merging, event hooks and content decoding
on top of httpcore; the proxy needs none of that: it sends bytes and passes bytes back.
Measured on a 2-core VM, that layer was about a third of the gateway's CPU per request.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpcore

# A model without max_concurrent (no limit): as many connections as httpx's default pool.
UNLIMITED_POOL = 100

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
        self.pool = httpcore.AsyncConnectionPool(
            max_connections=size, max_keepalive_connections=size, keepalive_expiry=60.0
        )

    def url(self, path: str) -> httpcore.URL:
        target = self.prefix + path.encode()
        return httpcore.URL(scheme=self.scheme, host=self.host, port=self.port, target=target)

    async def aclose(self) -> None:
        await self.pool.aclose()


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
