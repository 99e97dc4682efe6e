"""The daemon as a subprocess: remote leases from several client processes, a client killed
with SIGKILL, the budget invariant from the event stream, auth, bad input, status, shutdown."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.daemon.conftest import (
    ROOT,
    TOKEN,
    DaemonProcess,
    budget_violations,
    fake_server_model,
    read_events,
    write_config,
)

GIB = 2**30

CLIENT = textwrap.dedent(
    """
    import sys, anyio
    from orchestrator.client import RemoteOrchestrator

    async def main(url, token, what, rounds, hold_s):
        async with RemoteOrchestrator(url, token) as remote:
            for _ in range(rounds):
                if what.isdigit():
                    cm = remote.reserve(int(what), timeout=60, ttl_s=2)
                else:
                    cm = remote.acquire(what, timeout=60, ttl_s=2)
                async with cm as lease:
                    print("granted", lease.model, lease.id, flush=True)
                    if hold_s < 0:
                        await anyio.sleep_forever()
                    await anyio.sleep(hold_s)

    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    """
)


def client_process(
    tmp_path: Path, d: DaemonProcess, what: str, rounds: int, hold_s: float
) -> subprocess.Popen[str]:
    script = tmp_path / "client.py"
    if not script.exists():
        # Written once: writing it again for every process truncates the file that a process
        # started just before may not have read yet (it then runs an empty script and exits 0).
        script.write_text(CLIENT)
    return subprocess.Popen(
        [sys.executable, str(script), d.url, d.token or "", what, str(rounds), str(hold_s)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip


def test_client_processes_contend_and_a_killed_clients_lease_expires(
    tmp_path: Path, start_daemon: Any
) -> None:
    """Four client processes contend for three models and raw bytes; a fifth holds a
    reservation and is killed with SIGKILL: its lease expires after its ttl and the model
    waiting behind it gets the GPU. No event shows the ledger past the budget."""
    d = start_daemon(write_config(tmp_path, daemon={"lease_ttl_s": 1}), token=TOKEN)
    # The victim reserves 8 GiB (ttl 2 s: renewed while it lives) and is killed.
    victim = client_process(tmp_path, d, str(8 * GIB), 1, -1)
    assert victim.stdout is not None
    line = victim.stdout.readline()
    assert line.startswith("granted external-"), line
    victim_lease = line.split()[2]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=5)
    victim.stdout.close()
    killed_at = time.monotonic()

    clients = [client_process(tmp_path, d, what, 3, 0.05) for what in ("llm", "sdxl", "voice", str(2 * GIB))]
    outputs = []
    for c in clients:
        out, _ = c.communicate(timeout=60)
        outputs.append(out)
        assert c.returncode == 0, out
    assert all(out.count("granted") == 3 for out in outputs), outputs
    assert "granted qwen-14b" in outputs[0] and "granted sdxl-base" in outputs[1]
    assert "granted tts-small" in outputs[2]

    events = read_events(d)
    expired = [e for e in events if e["kind"] == "lease_expired"]
    assert [e["detail"].split()[0] for e in expired] == [victim_lease], expired
    # The killed client's lease ended by expiry, about a ttl (2 s) after its last renewal.
    assert time.monotonic() - killed_at >= 1.0
    assert not budget_violations(events)
    kinds = {e["kind"] for e in events}
    assert {"grant", "release", "load", "evict", "external_end"} <= kinds
    # Both heavy models were loaded at some point, and each time within the budget.
    loads = {e["model"] for e in events if e["kind"] == "load"}
    assert {"qwen-14b", "sdxl-base", "tts-small"} <= loads
    status = d.status()
    assert status["leases"] == [] and status["external"] == []
    assert status["committed_bytes"] <= status["budget_bytes"]


def test_auth_bad_input_and_status(tmp_path: Path, start_daemon: Any) -> None:
    d = start_daemon(write_config(tmp_path, daemon={"max_body_bytes": 4096}), token=TOKEN)
    with httpx.Client(base_url=d.url, timeout=10) as anon:
        r = anon.get("/v1/status")
        assert r.status_code == 401
        assert "Bearer" in r.json()["error"]["message"] and r.json()["error"]["type"] == "unauthorized"
        r = anon.get("/v1/models", headers={"authorization": "Bearer wrong-token-123"})
        assert r.status_code == 401 and "wrong bearer token" in r.json()["error"]["message"]
        assert anon.get("/health").status_code == 200  # tells nothing; open to probes

    budget = d.status()["budget_bytes"]
    bad: list[tuple[str, str, Any, int, str]] = [
        ("POST", "/v1/leases", b"{not json", 400, "not valid JSON"),
        ("POST", "/v1/leases", b"[1, 2]", 400, "expected a JSON object"),
        ("POST", "/v1/leases", b"", 400, "empty"),
        ("POST", "/v1/leases", {"model": "gpt-9"}, 404, "gpt-9"),
        ("POST", "/v1/leases", {"bytes": -5}, 400, "bytes must be at least 1"),
        ("POST", "/v1/leases", {"bytes": "many"}, 400, "bytes must be an integer"),
        ("POST", "/v1/leases", {"bytes": budget + 1}, 400, "more than the whole budget"),
        ("POST", "/v1/leases", {"model": "llm", "bytes": 5}, 400, "exactly one of model"),
        ("POST", "/v1/leases", {"model": "llm", "ttl_s": -1}, 400, "ttl_s"),
        ("POST", "/v1/leases", {"model": "llm", "ttl_s": 10**6}, 400, "max_lease_ttl_s"),
        ("POST", "/v1/leases", {"model": "llm", "colour": "red"}, 400, "unknown field(s) colour"),
        ("POST", "/v1/leases", {"model": "llm", "timeout": -2}, 400, "timeout"),
        ("POST", "/v1/leases", {"model": "llm", "holder": "x" * 5000}, 413, "max_body_bytes"),
        ("POST", "/v1/leases/lease-999/renew", None, 410, "no lease 'lease-999'"),
        ("DELETE", "/v1/leases/lease-999", None, 410, "POST /v1/leases"),
        ("POST", "/v1/chat/completions", {"messages": []}, 400, '"model"'),
        ("POST", "/v1/chat/completions", {"model": "nope", "messages": []}, 404, "GET /v1/models"),
        ("POST", "/v1/chat/completions", {"model": "sdxl", "messages": []}, 400, "/v1/images/generations"),
        ("POST", "/v1/images/generations", {"model": "sdxl"}, 400, '"prompt"'),
        ("POST", "/v1/audio/speech", {"model": "tts-small"}, 400, '"input"'),
        ("GET", "/v1/nothing-here", None, 404, "no such endpoint"),
    ]
    with d.client() as c:
        for method, path, body, status, words in bad:
            kw: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = c.request(method, path, **kw)
            assert r.status_code == status, (method, path, body, r.status_code, r.text)
            assert words in r.json()["error"]["message"], (path, body, r.json())
        # Bad input changed nothing: no lease, nothing loaded, the daemon still answers.
        status_now = c.get("/v1/status").json()
        assert status_now["leases"] == [] and status_now["committed_bytes"] == 0
        r = c.get("/v1/models")
        assert [m["id"] for m in r.json()["data"]] == ["qwen-14b", "sdxl-base", "tts-small"]
        assert {m["tier"] for m in r.json()["data"]} == {"disk"}

        r = c.post("/v1/leases", json={"model": "voice", "ttl_s": 30})
        assert r.status_code == 200 and r.json()["model"] == "tts-small"
        lease = r.json()
        assert c.post(f"/v1/leases/{lease['id']}/renew").json()["expires_at"] >= lease["expires_at"]
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert models["tts-small"]["tier"] == "gpu" and models["tts-small"]["leases"] == 1
        assert models["tts-small"]["vram_bytes"] == int(3.5 * 2**30)
        metrics = c.get("/metrics")
        assert metrics.status_code == 200
        assert 'vram_orchestrator_active_leases{model="tts-small"} 1.0' in metrics.text
        # The CLI's status --url shows the same daemon.
        out = subprocess.run(
            [sys.executable, "-m", "orchestrator", "status", "--url", d.url, "--token", TOKEN, "--json"],
            capture_output=True, text=True, timeout=30, cwd=ROOT,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["running"] is True and report["leases"][0]["id"] == lease["id"]
        out = subprocess.run(
            [sys.executable, "-m", "orchestrator", "status", "--url", d.url, "--token", TOKEN],
            capture_output=True, text=True, timeout=30, cwd=ROOT,
        )  # fmt: skip
        assert out.returncode == 0 and "tts-small" in out.stdout and f"lease {lease['id']}" in out.stdout
        # ... and timeline --url draws its recent events (the request ends after the history).
        if importlib.util.find_spec("matplotlib") is not None:
            chart = tmp_path / "daemon-timeline.png"
            out = subprocess.run(
                [sys.executable, "-m", "orchestrator", "timeline", "--url", d.url, "--token", TOKEN,
                 "-o", str(chart)],
                capture_output=True, text=True, timeout=60, cwd=ROOT,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert "1 switches" in out.stdout and "budget 15.50 GiB" in out.stdout, out.stdout
        assert c.delete(f"/v1/leases/{lease['id']}").json()["released"] is True
        r = c.post(f"/v1/leases/{lease['id']}/renew")
        assert r.status_code == 410 and "released by its holder" in r.json()["error"]["message"]
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "status", "--url", d.url],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.returncode == 1 and "HTTP 401" in out.stderr


def test_sigterm_unloads_everything_and_leaves_no_process(tmp_path: Path, start_daemon: Any) -> None:
    """A model server running, a remote lease held, an event stream open: SIGTERM ends it
    all within the grace period, exit code 0, and no child process is left."""
    models = {"fake": fake_server_model(), "tts-small": {"kind": "tts", "vram_gb": 3.5}}
    d = start_daemon(write_config(tmp_path, models=models, daemon={"grace_s": 2}))
    with d.client() as c:
        r = c.post(
            "/v1/chat/completions", json={"model": "llm", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "echo: hi"
        lease = c.post("/v1/leases", json={"model": "fake", "ttl_s": 60})
        assert lease.status_code == 200 and lease.json()["url"].startswith("http://127.0.0.1:")
        server_pid = d.status()["models"][0]["server"]["pid"]
        assert server_pid
        d.watch_servers()
        with c.stream("GET", "/v1/events") as events:
            t0 = time.monotonic()
            code = d.stop(timeout_s=15)
            lines = list(events.iter_lines())  # the stream ends cleanly: the daemon closed it
        assert time.monotonic() - t0 < 12
        assert all(line.startswith((":", "event:", "data:")) or not line for line in lines)
    assert code == 0, d.output
    assert server_pid in d.watched  # and stop() checked it is gone
    assert "stopped; everything unloaded" in d.output


def test_serve_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "serve", "--config", str(write_config(tmp_path)),
         "--host", "0.0.0.0", "--port", "0"],
        capture_output=True, text=True, timeout=30, cwd=ROOT, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.returncode == 1
    assert "needs a bearer token" in out.stderr and "VRAM_ORCHESTRATOR_TOKEN" in out.stderr


@pytest.mark.parametrize("what", ["llm", "bytes"])
def test_a_waiting_lease_request_that_disconnects_leaves_the_queue(
    tmp_path: Path, start_daemon: Any, what: str
) -> None:
    d = start_daemon(write_config(tmp_path))
    with d.client() as c:
        held = c.post("/v1/leases", json={"model": "sdxl", "ttl_s": 30}).json()
        body = {"model": "llm"} if what == "llm" else {"bytes": 10 * GIB}
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/leases", json=body, timeout=httpx.Timeout(5, read=0.5))
        deadline = time.monotonic() + 5
        while any(m["waiting"] for m in d.status()["models"]) or d.status()["external"]:
            assert time.monotonic() < deadline, d.status()
            time.sleep(0.05)
        assert c.delete(f"/v1/leases/{held['id']}").status_code == 200
        assert d.status()["leases"] == []
        assert d.status()["state"] == "SDXL_ACTIVE"  # nobody asked for the LLM any more
