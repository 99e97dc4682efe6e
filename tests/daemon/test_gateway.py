"""The OpenAI-compatible gateway against tests/fixtures/fake_openai_server.py (fast), through a
daemon subprocess: proxying, streaming, the lease held for exactly the request, a client that
disconnects mid-stream, a server that crashes mid-request, and the media endpoints."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from tests.daemon.conftest import (
    DaemonProcess,
    budget_violations,
    fake_server_model,
    read_events,
    write_config,
)


def models(chunk_delay_s: float = 0.0) -> dict[str, Any]:
    return {
        "fake-llm": fake_server_model(chunk_delay_s),
        "sdxl-base": {"kind": "sdxl", "vram_gb": 10.5},
        "tts-small": {"kind": "tts", "vram_gb": 3.5},
    }


def chat(text: str, **kw: Any) -> dict[str, Any]:
    return {"model": "llm", "messages": [{"role": "user", "content": text}], **kw}


def leases_of(d: DaemonProcess, model: str) -> int:
    return next(m["leases"] for m in d.status()["models"] if m["name"] == model)


def test_proxy_and_streaming_hold_the_lease_for_the_request(tmp_path: Path, start_daemon: Any) -> None:
    d = start_daemon(write_config(tmp_path, models=models(chunk_delay_s=0.2)))
    with d.client() as c:
        r = c.post("/v1/completions", json={"model": "fake-llm", "prompt": "one two"})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == "echo: one two"
        assert leases_of(d, "fake-llm") == 0  # the answer came: the lease ended with it
        pieces = []
        with c.stream("POST", "/v1/chat/completions", json=chat("a b c", stream=True)) as s:
            assert s.status_code == 200
            assert s.headers["content-type"].startswith("text/event-stream")
            for line in s.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                pieces.append(json.loads(line[6:])["choices"][0]["delta"]["content"])
                if len(pieces) == 1:
                    assert leases_of(d, "fake-llm") == 1  # held while the stream runs
        assert "".join(pieces) == "echo: a b c"
        deadline = time.monotonic() + 2
        while leases_of(d, "fake-llm"):
            assert time.monotonic() < deadline, "the lease outlived its stream"
            time.sleep(0.02)
        # An image request switches the GPU to SDXL: the LLM server is stopped for it.
        r = c.post("/v1/images/generations", json={"model": "sdxl", "prompt": "a cat"})
        assert r.status_code == 501, r.text
        assert r.json()["error"]["type"] == "not_implemented"
        r = c.post("/v1/audio/speech", json={"model": "tts-small", "input": "hello"})
        assert r.status_code == 501 and r.json()["error"]["message"]


def test_a_client_that_disconnects_mid_stream_releases_its_lease_at_once(
    tmp_path: Path, start_daemon: Any
) -> None:
    d = start_daemon(write_config(tmp_path, models=models(chunk_delay_s=1.0)))
    with d.client() as c:
        with c.stream("POST", "/v1/chat/completions", json=chat("w " * 50, stream=True)) as s:
            lines = s.iter_lines()  # kept: a dropped iterator would close the stream
            first = next(line for line in lines if line.startswith("data: "))
            assert "echo:" in first
            assert leases_of(d, "fake-llm") == 1
        t0 = time.monotonic()  # closed after the first of 50 one-second chunks
        while leases_of(d, "fake-llm"):
            assert time.monotonic() - t0 < 0.9, "the lease was not released when the client left"
            time.sleep(0.02)
        # Another model can take the GPU at once (no lease left on the LLM).
        r = c.post("/v1/leases", json={"model": "sdxl", "timeout": 5})
        assert r.status_code == 200, r.text
        assert c.delete(f"/v1/leases/{r.json()['id']}").status_code == 200


def test_a_server_crash_gives_502_or_503_and_the_next_request_recovers(
    tmp_path: Path, start_daemon: Any
) -> None:
    d = start_daemon(write_config(tmp_path, models=models()))
    with d.client() as c:
        assert c.post("/v1/chat/completions", json=chat("hi")).status_code == 200
        pid1 = d.status()["models"][0]["server"]["pid"]
        d.watch_servers()
        r = c.post("/v1/chat/completions", json=chat("crash"))
        assert r.status_code in (502, 503), r.text
        err = r.json()["error"]
        assert err["type"] in ("upstream_error", "backend_crashed")
        assert "retry" in err["message"] or "next request" in err["message"]
        # The next request restarts the server (after the crash back-off) and is answered.
        deadline = time.monotonic() + 20
        while True:
            r = c.post("/v1/chat/completions", json=chat("again"))
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "echo: again"
        pid2 = d.status()["models"][0]["server"]["pid"]
        assert pid2 != pid1
        d.watch_servers()
        # A crash after the stream began ends the stream with an error event.
        with c.stream(
            "POST", "/v1/completions", json={"model": "llm", "prompt": "crash mid-stream", "stream": True}
        ) as s:
            body = s.read().decode()
        assert s.status_code == 200
        assert '"text": "echo:"' in body and "upstream_error" in body
        events = read_events(d)
    assert not budget_violations(events)
    assert any(e["kind"] == "crash" for e in events)


async def test_remote_orchestrator_acquire_reserve_renew_and_cancel(
    tmp_path: Path, start_daemon: Any
) -> None:
    import anyio

    from orchestrator.client import RemoteError, RemoteOrchestrator

    d = start_daemon(write_config(tmp_path, models=models()))
    async with RemoteOrchestrator(d.url) as remote:
        async with remote.acquire("llm", timeout=20, ttl_s=0.6) as lease:
            assert lease.model == "fake-llm" and lease.url and lease.url.startswith("http://127.0.0.1:")
            async with httpx.AsyncClient(base_url=lease.url) as direct:  # the model's own server
                r = await direct.post("/v1/completions", json={"model": "fake-llm", "prompt": "x"})
                assert r.json()["choices"][0]["text"] == "echo: x"
            await anyio.sleep(1.5)  # longer than the ttl: the background renewal keeps it
            st = await remote.status()
            assert [x["id"] for x in st["leases"]] == [lease.id]
        assert (await remote.status())["leases"] == []
        listed = {m["id"]: m for m in await remote.models()}
        assert listed["fake-llm"]["tier"] == "gpu"
        # 8 GiB for a program of our own: the daemon evicts its idle LLM to make room.
        async with remote.reserve(8 * 2**30, timeout=20, pid=999_999) as res:
            assert res.kind == "external" and res.vram_bytes == 8 * 2**30
            st = await remote.status()
            assert st["external_bytes"] == 8 * 2**30
            assert {m["name"]: m["tier"] for m in st["models"]}["fake-llm"] == "disk"
            assert st["external"][0]["pid"] == 999_999
        # Cancelled while waiting (in another task): the request is withdrawn, nothing is left.
        async with remote.acquire("sdxl", timeout=10):

            async def other_task() -> None:
                with anyio.move_on_after(0.5):
                    async with remote.reserve(10 * 2**30, timeout=10):
                        raise AssertionError("granted beside a held 10.5 GiB model")

            async with anyio.create_task_group() as tg:
                tg.start_soon(other_task)
            await anyio.sleep(0.2)
            st = await remote.status()
            assert len(st["leases"]) == 1 and st["external"] == []
            # The same task waiting for room its own lease takes: told at once, as in process.
            t0 = anyio.current_time()
            try:
                async with remote.reserve(10 * 2**30, timeout=10):
                    raise AssertionError("granted beside a held 10.5 GiB model")
            except RemoteError as exc:
                assert exc.status == 409 and exc.type == "lease_deadlock", exc
                assert "sdxl" in exc.message
            assert anyio.current_time() - t0 < 5
            st = await remote.status()
            assert len(st["leases"]) == 1 and st["external"] == []
        try:
            async with remote.acquire("no-such-model"):
                raise AssertionError("an unknown model was granted")
        except RemoteError as exc:
            assert exc.status == 404 and "no-such-model" in exc.message
