"""The gateway benchmark's asyncio upstream (``benchmarks.fast_openai_server``) answers every
request as the tests' threaded fake OpenAI server does, byte for byte in its bodies (a
completion, a chat completion, their streams, an unknown model, an unknown path), so a proxy
measured in front of either does the same work; and it keeps a connection alive across
requests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
THREADED = [sys.executable, str(ROOT / "tests" / "fixtures" / "fake_openai_server.py")]
FAST = [sys.executable, "-m", "benchmarks.fast_openai_server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def servers() -> Iterator[tuple[str, str]]:
    procs, urls = [], []
    for cmd in (THREADED, FAST):
        port = free_port()
        procs.append(subprocess.Popen([*cmd, "--port", str(port), "--model", "bench"], cwd=ROOT))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url, proc in zip(urls, procs, strict=True):
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, f"the server at {url} exited with {proc.returncode}"
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"the server at {url} did not answer /health"
                time.sleep(0.05)
        yield urls[0], urls[1]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


REQUESTS = [
    ("/v1/completions", {"model": "bench", "prompt": "one two three", "max_tokens": 4}),
    ("/v1/completions", {"model": "bench", "prompt": "one two three", "stream": True}),
    ("/v1/chat/completions", {"model": "bench", "messages": [{"role": "user", "content": "hi there"}]}),
    ("/v1/chat/completions", {"model": "bench", "messages": [{"content": "hi there"}], "stream": True}),
    ("/v1/completions", {"model": "no-such-model", "prompt": "x"}),
    ("/v1/embeddings", {"model": "bench", "input": "x"}),
]


def test_it_answers_as_the_threaded_fake_server_does(servers: tuple[str, str]) -> None:
    threaded, fast = servers
    with httpx.Client(timeout=10) as a, httpx.Client(timeout=10) as b:
        for path, body in REQUESTS:
            want, got = a.post(threaded + path, json=body), b.post(fast + path, json=body)
            assert (got.status_code, got.content) == (want.status_code, want.content), path
            assert got.headers["content-type"] == want.headers["content-type"], path
            if body.get("stream"):
                assert got.content.endswith(b"data: [DONE]\n\n")
        for path in ("/health", "/v1/models"):
            want, got = a.get(threaded + path), b.get(fast + path)
            assert (got.status_code, got.json()) == (want.status_code, want.json()), path


def test_one_connection_carries_many_requests(servers: tuple[str, str]) -> None:
    _, fast = servers
    host, port = fast.removeprefix("http://").split(":")
    body = b'{"model": "bench", "prompt": "a"}'
    request = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    want = b'{"choices": [{"index": 0, "text": "echo: a"}]}'
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for _ in range(20):
            sock.sendall(request)
            answer = b""
            while not answer.endswith(want):
                data = sock.recv(65536)
                assert data, "the server closed the connection"
                answer += data
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
