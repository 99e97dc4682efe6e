"""The least an HTTP proxy can do, as a reference for ``benchmarks.gateway_overhead``.

A TCP relay on uvloop (asyncio's loop without it): each client connection gets its own
connection to the server, and bytes pass both ways as they come, unread. No HTTP parsing, no
routing, no lease: what is left is the proxy's share of any proxied request (two more socket
reads and writes on each side, and one more process for the kernel to schedule). The one
change it makes is ``--rename FROM=TO``: the model's name in a request (``"FROM"`` becomes
``"TO"`` padded with spaces, so the body keeps its length; ``TO`` may not be longer), as the
gateway's clients ask for ``bench-llm`` and the server serves ``bench``. A name split across
two reads is not renamed: the benchmark's requests are small enough to come in one.

Run: ``python -m benchmarks.tcp_relay PORT UPSTREAM_URL [--rename FROM=TO]``.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import Any
from urllib.parse import urlsplit


def _nodelay(transport: Any) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _ToServer(asyncio.Protocol):
    def __init__(self, client: _FromClient) -> None:
        self.client = client

    def connection_made(self, transport: Any) -> None:
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class _FromClient(asyncio.Protocol):
    def __init__(self, upstream: tuple[str, int], rename: tuple[bytes, bytes] | None) -> None:
        self.upstream, self.rename = upstream, rename
        self.transport: Any = None
        self.server: Any = None  # the transport to the server, once connected
        self.pending: list[bytes] = []
        self.closed = False
        self.connecting: asyncio.Future[None] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        _nodelay(transport)
        self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            server, _ = await loop.create_connection(lambda: _ToServer(self), *self.upstream)
        except OSError:
            self.transport.close()
            return
        if self.closed:
            server.close()
            return
        self.server = server
        for data in self.pending:
            server.write(data)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.rename is not None:
            data = data.replace(*self.rename)
        if self.server is None:
            self.pending.append(data)
        else:
            self.server.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.server is not None:
            self.server.close()


def _rename(text: str) -> tuple[bytes, bytes]:
    old, sep, new = text.partition("=")
    if not sep or not old or len(new) > len(old):
        raise argparse.ArgumentTypeError(f"--rename takes FROM=TO with TO no longer than FROM, not {text!r}")
    return f'"{old}"'.encode(), f'"{new}"'.encode() + b" " * (len(old) - len(new))


async def serve(port: int, upstream: str, rename: tuple[bytes, bytes] | None) -> None:
    u = urlsplit(upstream)
    if u.hostname is None or u.port is None:
        raise SystemExit(f"the upstream must be a URL with a host and a port, not {upstream!r}")
    loop = asyncio.get_running_loop()
    target = (u.hostname, u.port)
    server = await loop.create_server(lambda: _FromClient(target, rename), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("port", type=int)
    p.add_argument("upstream", help="the server's base URL (http://HOST:PORT)")
    p.add_argument("--rename", type=_rename, metavar="FROM=TO", help="rename the model in requests")
    args = p.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port, args.upstream, args.rename))
    else:
        uvloop.run(serve(args.port, args.upstream, args.rename))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
