"""The gateway's connections to the models' servers: one keep-alive pool per model, sized to
what the model serves at once (``models.<name>.max_concurrent``), each connection an asyncio
protocol that speaks just the HTTP/1.1 the proxy needs.

The proxy sends one request's bytes and passes the answer's bytes back: a general HTTP
client's request and response objects, header validation, locks and cancel scopes around
every read and write cost more than the rest of a proxied request together (httpcore took
about 0.35 ms of CPU per request on a 2-core VM, this about 0.03 ms). A request here is one
``transport.write``; the answer is parsed as the event loop hands its bytes over, with
httptools (the C parser uvicorn uses, the ``fast`` extra) when installed and h11 otherwise,
and what one read brought is passed on at once: the chunks of a stream that arrive together
go to the client together, as one write.

A request takes the most recently used idle connection (closed ones are passed over: the
event loop tells a connection when its server closes it, and a connection is checked for
an end that is still in flight before it is reused) and gives it back when its answer has
been read to the end. The model's lease already bounds how many requests are in flight
(``max_concurrent``), so the pool needs no wait of its own: it keeps at most ``size`` idle
connections. An answer read only in part (the client went away, the work was cancelled)
closes its connection, which tells the server to stop.

The connections run on asyncio's event loop (uvloop's included), as uvicorn does.
"""

from __future__ import annotations

import asyncio
import select
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import h11

httptools: Any
try:
    import httptools
except ImportError:  # the fast extra is not installed: h11 parses
    httptools = None

# A model without max_concurrent (no limit): as many connections as httpx's default pool.
UNLIMITED_POOL = 100
KEEPALIVE_S = 60.0  # an idle connection older than this is closed instead of reused
READ_PAUSE_BYTES = 256 * 1024  # an answer's bytes waiting for a slow client: stop reading past this


class UpstreamError(Exception):
    """The model's server broke the exchange: it closed the connection before its answer
    ended, or what it sent is not HTTP/1.1."""


# What a failing upstream raises: a broken exchange, or a refused, reset or unreachable
# connection (OSError).
UPSTREAM_ERRORS: tuple[type[Exception], ...] = (UpstreamError, OSError)


class _Parser(Protocol):
    """One connection's HTTP/1.1 answers, fed as they come; it tells its connection about
    the answer's head, its body's bytes and its end (``Connection._head``, ``_body``,
    ``_end``)."""

    def request(self, head: bytes, body: bytes) -> bytes: ...  # the bytes to send

    def feed(self, data: bytes) -> None: ...

    def eof(self) -> None: ...  # the server closed the connection


class _HttptoolsParser:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.parser: Any = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.framed = False  # the body's end is in the answer (a length, chunked, or none)

    def request(self, head: bytes, body: bytes) -> bytes:
        self.parser = httptools.HttpResponseParser(self)
        self.headers = []
        self.framed = False
        return head + body

    def feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise UpstreamError(f"the server's answer is not HTTP/1.1 ({exc})") from None

    def eof(self) -> None:
        if self.conn.has_head and not self.framed:  # a body that lasts until the connection closes
            self.conn._end(keep_alive=False)

    # httptools' callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
            self.framed = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # an informational answer (100 Continue): the real one follows
            self.headers, self.framed = [], False
            return
        if status in (204, 304):
            self.framed = True
        self.conn._head(status, self.headers)

    def on_body(self, body: bytes) -> None:
        self.conn._body(body)

    def on_message_complete(self) -> None:
        if self.conn.has_head:
            self.conn._end(keep_alive=self.parser.should_keep_alive())


class _H11Parser:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.h11 = h11.Connection(h11.CLIENT)

    def request(self, head: bytes, body: bytes) -> bytes:
        lines = head.split(b"\r\n")
        method, target, _ = lines[0].split(b" ", 2)
        headers = [(name, value) for name, _, value in (line.partition(b": ") for line in lines[1:] if line)]
        if self.h11.our_state is h11.DONE:
            self.h11.start_next_cycle()
        out = self.h11.send(h11.Request(method=method, target=target, headers=headers)) or b""
        out += self.h11.send(h11.Data(data=body)) or b""
        return out + (self.h11.send(h11.EndOfMessage()) or b"")

    def feed(self, data: bytes) -> None:
        self.h11.receive_data(data)
        self._events()

    def eof(self) -> None:
        self.h11.receive_data(b"")
        try:
            self._events()  # the end of a body that lasts until the connection closes
        except UpstreamError:
            pass  # an answer cut short: the connection says so as it closes

    def _events(self) -> None:
        try:
            while True:
                event = self.h11.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    return
                if isinstance(event, h11.Response):
                    self.conn._head(event.status_code, [(k, v) for k, v in event.headers])
                elif isinstance(event, h11.Data):
                    self.conn._body(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    self.conn._end(keep_alive=self.h11.their_state is h11.DONE)
        except h11.RemoteProtocolError as exc:
            raise UpstreamError(f"the server's answer is not HTTP/1.1 ({exc})") from None


class Connection(asyncio.Protocol):
    """One keep-alive connection to a model's server, one exchange at a time: ``send`` the
    request, then ``head``, then ``read`` (the whole body) or ``next_chunk`` until it is
    empty. ``status`` and ``headers`` (names lower-case) are the answer's once ``head`` has
    returned."""

    def __init__(self) -> None:
        self.parser: _Parser = _HttptoolsParser(self) if httptools is not None else _H11Parser(self)
        self.transport: asyncio.Transport | None = None
        self.fd = -1
        self.closed = False  # by either side
        self.idle_since_s = 0.0
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.has_head = False
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self._busy = False  # an exchange is in progress
        self._chunks: list[bytes] = []
        self._queued_bytes = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    # -- the event loop's side -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is no subclass)
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1

    def data_received(self, data: bytes) -> None:
        if not self._busy or self.complete:  # bytes nobody asked for: the connection is unusable
            self._fail(UpstreamError("the server sent bytes after its answer ended"))
            return
        try:
            self.parser.feed(data)
        except UpstreamError as exc:
            self._fail(exc)
            return
        if self._queued_bytes > READ_PAUSE_BYTES and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        if self._busy and not self.complete:
            try:
                self.parser.eof()
            except UpstreamError as exc:
                self._fail(exc)
        return None  # (close the transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._busy and not self.complete and self.error is None:
            why = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
            what = "its answer ended" if self.has_head else "it answered"
            self.error = UpstreamError(f"the server closed the connection before {what}{why}")
        self._wake()

    def _fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        self.close()
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- the parser's side ------------------------------------------------------------------

    def _head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status, self.headers, self.has_head = status, headers, True

    def _body(self, data: bytes) -> None:
        self._chunks.append(data)
        self._queued_bytes += len(data)

    def _end(self, *, keep_alive: bool) -> None:
        self.complete, self.keep_alive = True, keep_alive

    # -- the exchange ---------------------------------------------------------------------------

    def send(self, head: bytes, body: bytes) -> None:
        """Begin an exchange: ``head`` (the request line and headers, with the blank line) and
        ``body``."""
        assert self.transport is not None and not self._busy
        self._busy = True
        self.status, self.headers, self.has_head, self.complete, self.keep_alive = 0, [], False, False, False
        self.transport.write(self.parser.request(head, body))

    async def _wait(self) -> None:
        if self.error is not None:
            raise self.error
        fut = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await fut
        finally:
            self._waiter = None

    async def head(self) -> None:
        """Wait for the answer's status and headers."""
        while not self.has_head:
            await self._wait()

    def _take(self) -> bytes:
        chunks, self._chunks, self._queued_bytes = self._chunks, [], 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def next_chunk(self) -> bytes:
        """The body's bytes that have come since the last call (all of them at once), waiting
        for more when none have; ``b""`` at its end."""
        while True:
            if self._chunks:
                return self._take()
            if self.complete:
                return b""
            await self._wait()

    @property
    def ended(self) -> bool:
        """The body has come to its end and every byte of it has been taken."""
        return self.complete and not self._chunks

    async def read(self) -> bytes:
        """The whole body."""
        parts: list[bytes] = []
        while True:
            if self._chunks:
                parts.append(self._take())  # (taken as they come: reading never pauses here)
            if self.complete:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            await self._wait()

    def finish(self) -> bool:
        """End the exchange; whether the connection can carry another."""
        self._busy = False
        reusable = self.complete and self.keep_alive and self.error is None and not self.closed
        self._chunks, self._queued_bytes = [], 0
        return reusable

    def usable(self, now_s: float) -> bool:
        """Still open, not idle for too long, and nothing (an end, stray bytes) waiting to be
        read on it."""
        if self.closed or now_s - self.idle_since_s > KEEPALIVE_S:
            return False
        return self.fd < 0 or not select.select([self.fd], [], [], 0)[0]

    def close(self) -> None:
        """Close at once (a partly read answer: the server is told to stop)."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Upstream:
    """One model's server: its base URL and a pool of keep-alive connections to it."""

    def __init__(self, base_url: str, size: int) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"a model server's base URL must be http(s)://host[:port], got {base_url!r}")
        self.base_url = base_url
        self.size = size
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/").encode()
        self.host_header = parts.netloc.encode()
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if parts.scheme == "https" else None
        self._idle: list[Connection] = []
        self._closed = False

    def head(self, path: str, content_length: int) -> bytes:
        """A JSON ``POST`` to ``path`` (under the base URL's own path): the request line and
        headers."""
        return (
            b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            % (
                self.prefix + path.encode(),
                self.host_header,
                content_length,
            )
        )

    async def _connection(self) -> Connection:
        """The most recently used idle connection that is still usable, else a new one."""
        now_s = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable(now_s):
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            Connection, self.host, self.port, ssl=self._ssl, server_hostname=self.host if self._ssl else None
        )
        return conn

    @asynccontextmanager
    async def request(self, path: str, body: bytes) -> AsyncIterator[Connection]:
        """``POST`` ``body`` to ``path`` on a pooled connection; the block has the answer's
        head and reads its body. The connection goes back to the pool when the body was read
        to its end, and is closed otherwise."""
        conn = await self._connection()
        try:
            conn.send(self.head(path, len(body)), body)
            await conn.head()
            yield conn
        finally:
            if conn.finish() and not self._closed and len(self._idle) < self.size:
                conn.idle_since_s = time.monotonic()
                self._idle.append(conn)
            else:
                conn.close()

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


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
