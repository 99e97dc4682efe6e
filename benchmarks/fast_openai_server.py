"""The gateway benchmark's upstream: the fake OpenAI server's answers, from one asyncio
protocol (uvloop when installed) instead of a thread per connection.

tests/fixtures/fake_openai_server.py (stdlib ``ThreadingHTTPServer``) is what the tests need
(it can be told to misbehave), but as a benchmark's upstream it is the slowest part under
load: its threads take turns on the GIL (a thread that has the GIL keeps it for up to
``sys.getswitchinterval()``, 5 ms), and its listen backlog is 5, so a burst of new connections
has SYNs dropped and retried a second later. Straight to it, 16 clients saw a p99 of 11 times
the p50. A proxy measured in front of it would inherit that tail, so this server answers the
same requests in the same shapes (a completion, or a stream of one server-sent event per word
of the echo, each its own chunk and its own write, then ``data: [DONE]``) without it: one
thread, no per-request allocations beyond the answer itself, a backlog of 1024.

Run: ``python -m benchmarks.fast_openai_server --port PORT [--model NAME]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
from typing import Any, cast


def _response(status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
    reason = {200: b"OK", 404: b"Not Found", 400: b"Bad Request"}.get(status, b"Error")
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n"
        % (status, reason, content_type, len(body))
        + body
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


class Answers:
    """What the server says to each request (the fake OpenAI server's shapes)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.models = _response(
            200, json.dumps({"object": "list", "data": [{"id": model, "object": "model"}]}).encode()
        )
        self.health = _response(200, b"{}")
        self.not_found = _response(404, b'{"error": "not found"}')

    def get(self, path: bytes) -> list[bytes]:
        if path == b"/health":
            return [self.health]
        if path == b"/v1/models":
            return [self.models]
        return [self.not_found]

    def post(self, path: bytes, raw: bytes) -> list[bytes]:
        if path not in (b"/v1/chat/completions", b"/v1/completions"):
            return [self.not_found]
        try:
            body: dict[str, Any] = json.loads(raw or b"{}")
        except ValueError:
            return [_response(400, b'{"error": "invalid JSON"}')]
        if "model" in body and body["model"] != self.model:
            message = {"error": {"message": f"model {body.get('model')!r} does not exist"}}
            return [_response(404, json.dumps(message).encode())]
        chat = path == b"/v1/chat/completions"
        text = str(body.get("messages", [{}])[-1].get("content", "") if chat else body.get("prompt", ""))
        if body.get("stream"):
            writes = [STREAM_HEAD]
            for i, word in enumerate(f"echo: {text}".split()):
                piece = word if i == 0 else " " + word
                choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                event = json.dumps({"model": self.model, "choices": [choice]})
                writes.append(_chunk(f"data: {event}\n\n".encode()))
            writes += [_chunk(b"data: [DONE]\n\n"), b"0\r\n\r\n"]
            return writes
        if chat:
            answer: dict[str, Any] = {
                "choices": [{"message": {"role": "assistant", "content": f"echo: {text}"}}]
            }
        else:
            answer = {"choices": [{"index": 0, "text": f"echo: {text}"}]}
        return [_response(200, json.dumps(answer).encode())]


class Connection(asyncio.Protocol):
    """One client's keep-alive connection: requests parsed from the buffer as they complete
    (``Content-Length`` bodies only, as every OpenAI client sends), answered in order."""

    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].split(b"\r\n")
            method, path, _ = head[0].split(b" ", 2)
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            start = end + 4
            if len(self.buffer) < start + length:
                return
            raw, self.buffer = self.buffer[start : start + length], self.buffer[start + length :]
            writes = self.answers.post(path, raw) if method == b"POST" else self.answers.get(path)
            assert self.transport is not None
            for w in writes:  # one write per chunk, as a server streaming tokens makes them
                self.transport.write(w)


async def serve(host: str, port: int, model: str) -> None:
    loop = asyncio.get_running_loop()
    answers = Answers(model)
    server = await loop.create_server(
        lambda: Connection(answers), host, port, backlog=1024, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"fast fake server pid {os.getpid()} serving on {host}:{port}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="fake-model")
    args = p.parse_args()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(serve(args.host, args.port, args.model))


if __name__ == "__main__":
    main()
