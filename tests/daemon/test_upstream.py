"""The gateway's upstream pool (``orchestrator.daemon.upstream``) against a small keep-alive
server that counts its connections: a connection is reused while it stays open, one the server
closed is replaced (not failed on), at most ``size`` stay idle, and a server that moved gets a
new pool. And the answers the connection parses (with httptools and with h11): bodies framed
by a length, chunked or ending with the connection, streamed chunks that come together read
as one piece, and a server that breaks off its answer or sends no HTTP at all."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream

from orchestrator.daemon import upstream
from orchestrator.daemon.upstream import Upstream, UpstreamError, Upstreams
from tests.orchestrator.conftest import wait_until

pytestmark = pytest.mark.anyio

PARSERS = ["h11"] + (["httptools"] if upstream.httptools is not None else [])


@pytest.fixture(params=PARSERS, autouse=True)
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test with each parser the connection can use (httptools only when installed)."""
    if request.param == "h11":
        monkeypatch.setattr(upstream, "httptools", None)
    return str(request.param)


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
    async with up.request("/v1/completions", b"{}") as answer:
        assert answer.status == 200
        return await answer.read()


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


# -- the answers a connection parses -----------------------------------------------------------


READ_ON = b"(read on)"


class Scripted:
    """Answers every request on a connection with the next of ``answers``: a list of steps,
    each bytes to send, an ``anyio.Event`` to wait for, ``None`` to close the connection, or
    ``READ_ON`` to read until the client closes it."""

    def __init__(self, *answers: list[bytes | anyio.Event | None]) -> None:
        self.answers = list(answers)
        self.connections = 0
        self.ended = anyio.Event()  # a connection ended (closed by either side)

    async def handle(self, stream: SocketStream) -> None:
        self.connections += 1
        buf = b""
        try:
            async with stream:
                while self.answers:
                    while b"\r\n\r\n" not in buf:
                        buf += await stream.receive()
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    length = next(
                        int(x.split(b":")[1])
                        for x in head.lower().split(b"\r\n")
                        if x.startswith(b"content-length")
                    )
                    while len(buf) < length:
                        buf += await stream.receive()
                    buf = buf[length:]
                    for step in self.answers.pop(0):
                        if step is None:
                            return
                        if step is READ_ON:
                            while True:
                                await stream.receive()
                        if isinstance(step, anyio.Event):
                            await step.wait()
                        else:
                            await stream.send(step)
                await stream.receive()  # until the client closes
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
        finally:
            self.ended.set()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
EVENTS = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]


async def test_chunks_that_come_together_are_read_as_one_piece_and_the_connection_is_reused() -> None:
    server = Scripted([STREAM_HEAD + b"".join(chunk(e) for e in EVENTS) + b"0\r\n\r\n"], [ANSWER])
    async with anyio.create_task_group() as tg:
        up = Upstream(await serving(server, tg), size=1)
        async with up.request("/v1/completions", b"{}") as answer:
            assert answer.status == 200
            assert (b"content-type", b"text/event-stream") in answer.headers  # names lower-case
            assert await answer.next_chunk() == b"".join(EVENTS)
            assert answer.ended  # (the end came in the same read: the gateway ends the body with it)
            assert await answer.next_chunk() == b""
        assert await get(up) == b"{}"
        assert server.connections == 1
        await up.aclose()
        tg.cancel_scope.cancel()


async def test_chunks_that_come_apart_are_read_as_they_come() -> None:
    later = anyio.Event()
    server = Scripted([STREAM_HEAD + chunk(EVENTS[0]), later, chunk(EVENTS[1]) + b"0\r\n\r\n"])
    async with anyio.create_task_group() as tg:
        up = Upstream(await serving(server, tg), size=1)
        async with up.request("/v1/completions", b"{}") as answer:
            assert await answer.next_chunk() == EVENTS[0]  # before the server sent the rest
            assert not answer.ended
            later.set()
            assert await answer.next_chunk() == EVENTS[1]
            assert await answer.next_chunk() == b""
        await up.aclose()
        tg.cancel_scope.cancel()


async def test_a_body_that_ends_with_the_connection_is_read_whole_and_the_connection_not_reused() -> None:
    server = Scripted([b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"a"', b": 1}", None])
    async with anyio.create_task_group() as tg:
        up = Upstream(await serving(server, tg), size=1)
        async with up.request("/v1/completions", b"{}") as answer:
            assert await answer.read() == b'{"a": 1}'
        assert not up._idle
        await up.aclose()
        tg.cancel_scope.cancel()


async def test_an_answer_that_says_connection_close_is_not_reused() -> None:
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
    server = Scripted([closing], [ANSWER])
    async with anyio.create_task_group() as tg:
        up = Upstream(await serving(server, tg), size=1)
        assert await get(up) == b"{}"
        assert not up._idle
        assert await get(up) == b"{}"
        assert server.connections == 2
        await up.aclose()
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("steps", "error"),
    [
        ([None], "closed the connection before it answered"),
        ([b'HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{"a"', None], "before its answer ended"),
        ([STREAM_HEAD + chunk(EVENTS[0]), None], "before its answer ended"),
        ([b"SSH-2.0-OpenSSH_9.6\r\n\r\n"], "not HTTP/1.1"),
    ],
    ids=["no answer", "short body", "stream cut", "no HTTP"],
)
async def test_a_broken_answer_raises_upstream_error_and_its_connection_is_closed(
    steps: list[bytes | anyio.Event | None], error: str
) -> None:
    server = Scripted(steps)
    async with anyio.create_task_group() as tg:
        up = Upstream(await serving(server, tg), size=1)
        with pytest.raises(UpstreamError, match=error):
            async with up.request("/v1/completions", b"{}") as answer:
                while await answer.next_chunk():
                    pass
        assert not up._idle
        await up.aclose()
        tg.cancel_scope.cancel()


async def test_an_answer_read_in_part_closes_its_connection_and_the_server_sees_it_end() -> None:
    server = Scripted([STREAM_HEAD + chunk(EVENTS[0]), READ_ON])
    async with anyio.create_task_group() as tg:
        up = Upstream(await serving(server, tg), size=1)
        with anyio.CancelScope() as scope:
            async with up.request("/v1/completions", b"{}") as answer:
                assert await answer.next_chunk() == EVENTS[0]
                scope.cancel()  # the client went away
                await answer.next_chunk()
        assert scope.cancelled_caught and not up._idle
        with anyio.fail_after(10):
            await server.ended.wait()
        await up.aclose()
        tg.cancel_scope.cancel()


async def test_a_refused_connection_raises_os_error() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()  # nothing listens there now
    up = Upstream(f"http://127.0.0.1:{port}", size=1)
    with pytest.raises(OSError):
        await get(up)


async def test_answers_larger_than_the_read_pause_are_read_whole_plain_and_streamed() -> None:
    big = bytes(range(256)) * (4 * upstream.READ_PAUSE_BYTES // 256)  # 1 MiB
    plain = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big
    pieces = [big[i : i + 65536] for i in range(0, len(big), 65536)]
    streamed = STREAM_HEAD + b"".join(chunk(p) for p in pieces) + b"0\r\n\r\n"
    server = Scripted([plain], [streamed])
    async with anyio.create_task_group() as tg:
        up = Upstream(await serving(server, tg), size=1)
        async with up.request("/v1/completions", b"{}") as answer:
            assert await answer.read() == big
        got = []
        async with up.request("/v1/completions", b"{}") as answer:
            await wait_until(lambda: answer._paused, what="reading paused: the answer's bytes wait unread")
            while piece := await answer.next_chunk():
                got.append(piece)
        assert b"".join(got) == big and server.connections == 1
        await up.aclose()
        tg.cancel_scope.cancel()
