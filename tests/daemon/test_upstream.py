"""The gateway's upstream pool (``orchestrator.daemon.upstream``) against a small keep-alive
server that counts its connections: a connection is reused while it stays open, one the server
closed is replaced (not failed on), at most ``size`` stay idle, and a server that moved gets a
new pool."""

from __future__ import annotations

from typing import Any

import anyio
import httpcore
import pytest
from anyio.abc import SocketStream

from orchestrator.daemon.upstream import Upstream, Upstreams
from tests.orchestrator.conftest import wait_until

pytestmark = pytest.mark.anyio

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class Server:
    """Answers each request with ``{}``; closes a connection after ``close_after`` answers."""

    def __init__(self, close_after: int | None = None) -> None:
        self.connections = 0
        self.requests = 0
        self.closed = 0  # connections this server has closed
        self.close_after = close_after

    async def handle(self, stream: SocketStream) -> None:
        self.connections += 1
        answered = 0
        buf = b""
        async with stream:
            while True:
                try:
                    buf += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                while b"\r\n\r\n" in buf:
                    head, _, rest = buf.partition(b"\r\n\r\n")
                    lines = head.lower().split(b"\r\n")
                    length = next(
                        (int(x.split(b":")[1]) for x in lines if x.startswith(b"content-length")), 0
                    )
                    if len(rest) < length:
                        break
                    buf = rest[length:]
                    self.requests += 1
                    await stream.send(ANSWER)
                    answered += 1
                    if self.close_after is not None and answered >= self.close_after:
                        self.closed += 1
                        return


async def serving(server: Server, tg: Any) -> str:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")

    async def serve() -> None:
        async with listener:
            await listener.serve(server.handle)

    tg.start_soon(serve)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    return f"http://127.0.0.1:{port}"


async def get(up: Upstream) -> bytes:
    req = httpcore.Request(
        b"POST",
        up.url("/v1/completions"),
        headers=[(b"host", up.host_header), (b"content-length", b"2")],
        content=b"{}",
    )
    async with up.request(req) as response:
        assert response.status == 200
        return await response.aread()


async def test_a_connection_is_reused_while_open_and_replaced_once_the_server_closed_it() -> None:
    server = Server(close_after=3)
    async with anyio.create_task_group() as tg:
        up = Upstream(await serving(server, tg), size=4)
        for _ in range(3):
            assert await get(up) == b"{}"
        assert server.connections == 1  # keep-alive: one connection for three requests
        await wait_until(lambda: server.closed == 1, what="the server closed it after its third answer")
        assert await get(up) == b"{}"  # not an error: a fresh connection
        assert server.connections == 2
        await up.aclose()
        tg.cancel_scope.cancel()


async def test_concurrent_requests_open_one_connection_each_and_at_most_size_stay_idle() -> None:
    server = Server()
    async with anyio.create_task_group() as tg:
        up = Upstream(await serving(server, tg), size=2)
        async with anyio.create_task_group() as load:
            for _ in range(5):
                load.start_soon(get, up)
        assert server.requests == 5 and server.connections == 5
        assert len(up._idle) == 2
        for _ in range(4):
            await get(up)
        assert server.connections == 5  # the two idle ones served the rest
        await up.aclose()
        tg.cancel_scope.cancel()


async def test_a_server_that_moved_gets_a_new_pool_and_the_old_one_is_closed() -> None:
    ups = Upstreams()
    a, b = Server(), Server()
    async with anyio.create_task_group() as tg:
        url_a, url_b = await serving(a, tg), await serving(b, tg)
        first = await ups.get("llm", url_a, 4)
        await get(first)
        assert await ups.get("llm", url_a, 4) is first
        second = await ups.get("llm", url_b, 4)
        assert second is not first and first._closed and not first._idle
        await get(second)
        assert (a.requests, b.requests) == (1, 1)
        await ups.aclose()
        tg.cancel_scope.cancel()


def test_a_base_url_that_is_no_http_url_is_refused() -> None:
    with pytest.raises(ValueError, match="http"):
        Upstream("unix:///tmp/socket", 1)
