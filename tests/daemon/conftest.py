"""The daemon as a real subprocess on loopback: configs, start, stop, and the check that
nothing of it (the daemon, its model servers) is left behind."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.backends.server import live_processes

ROOT = Path(__file__).resolve().parents[2]
FAKE_SERVER = str(ROOT / "tests" / "fixtures" / "fake_openai_server.py")
TOKEN = "test-token-0123456789"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def fake_server_model(chunk_delay_s: float = 0.0, vram_gb: float = 11.5) -> dict[str, Any]:
    return {
        "kind": "llm",
        "vram_gb": vram_gb,
        "backend": {
            "type": "server",
            "command": [sys.executable, FAKE_SERVER, "--port", "{port}", "--model", "{model}",
                        "--chunk-delay", str(chunk_delay_s)],
            "served_model": "fake-llm",
            "start_timeout_s": 20,
            "stop_grace_s": 2,
        },
    }  # fmt: skip


def write_config(
    tmp_path: Path,
    models: dict[str, Any] | None = None,
    daemon: dict[str, Any] | None = None,
    **switching: Any,
) -> Path:
    """A small simulated 16 GiB card (budget 15.5 GiB) with fast simulated latencies."""
    models = models or {
        "qwen-14b": {"kind": "llm", "vram_gb": 11.5},
        "sdxl-base": {"kind": "sdxl", "vram_gb": 10.5},
        "tts-small": {"kind": "tts", "vram_gb": 3.5, "aliases": ["voice"]},
    }
    for spec in models.values():
        if isinstance(spec.get("backend"), dict):
            spec["backend"].setdefault("log_dir", str(tmp_path / "logs"))
    cfg = {
        "hardware": {"device": "simulated", "total_vram_gb": 16, "safe_max_vram_gb": 15.5},
        "switching": {
            "fairness_s": 0.05, "max_wait_s": 10, "retry_backoff_s": 0.05, "unload_timeout_s": 5,
            "load_timeout_s": 30, **switching,
        },
        "simulation": {"time_scale": 0.01},
        "monitor": {"sample_hz": 0, "footprints_path": None},
        "models": models,
        "daemon": {"grace_s": 3, "lease_ttl_s": 5, **(daemon or {})},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def descendants(pid: int) -> list[int]:
    """Live processes below ``pid`` (children, grandchildren...)."""
    procs = list(live_processes())
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, ppid, _ in procs if ppid == parent]
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    return any(p == pid for p, _, _ in live_processes())


class DaemonProcess:
    """``python -m orchestrator serve`` on 127.0.0.1 and a free port."""

    def __init__(self, config: Path, *, token: str | None = None, extra: list[str] | None = None) -> None:
        argv = [sys.executable, "-m", "orchestrator", "serve", "--config", str(config), "--port", "0"]
        if token:
            argv += ["--token", token]
        env = {k: v for k, v in os.environ.items() if k != "VRAM_ORCHESTRATOR_TOKEN"}
        self.proc = subprocess.Popen(
            argv + (extra or []), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
            start_new_session=True,
        )  # fmt: skip
        self.token = token
        self.output = ""
        self.url = self._wait_url(timeout_s=30)
        self.headers = {"authorization": f"Bearer {token}"} if token else {}
        self.watched: set[int] = set()  # pids that must be gone after the stop (model servers)

    def _wait_url(self, timeout_s: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                self.output += line.decode(errors="replace")
                if b"serving" in line:
                    return line.decode().split(" on ")[1].split()[0]
                if not line and self.proc.poll() is not None:
                    break
        self.kill()
        raise AssertionError(f"the daemon did not start within {timeout_s} s:\n{self.output}")

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, **{"timeout": 30, **kw})

    def status(self) -> dict[str, Any]:
        with self.client() as c:
            r = c.get("/v1/status")
            r.raise_for_status()
            return dict(r.json())

    def watch_servers(self) -> None:
        """Remember the pids of the model servers running now: they must be gone at the end."""
        for m in self.status()["models"]:
            if m["server"] and m["server"]["pid"]:
                self.watched.add(int(m["server"]["pid"]))
        self.watched.update(descendants(self.proc.pid))

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, wait, and check that nothing of it is left; returns the exit code."""
        self.watch_servers_quietly()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the daemon did not stop within {timeout_s} s of SIGTERM") from None
        finally:
            assert self.proc.stdout is not None
            self.output += self.proc.stdout.read().decode(errors="replace")
            self.proc.stdout.close()
        deadline = time.monotonic() + 5
        while any(alive(p) for p in self.watched) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [p for p in self.watched if alive(p)]
        assert not left, f"processes left behind after the daemon stopped: {left}"
        return code

    def watch_servers_quietly(self) -> None:
        if self.proc.poll() is None:
            try:
                self.watch_servers()
            except httpx.HTTPError:
                self.watched.update(descendants(self.proc.pid))

    def kill(self) -> None:
        if self.proc.poll() is None:
            for p in descendants(self.proc.pid):
                self.watched.add(p)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        for p in self.watched:
            if alive(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def start_daemon() -> Iterator[Any]:
    """Start daemons; each is stopped with SIGTERM at the end (if the test did not) and must
    exit 0 leaving no process behind."""
    started: list[DaemonProcess] = []

    def start(config: Path, **kw: Any) -> DaemonProcess:
        d = DaemonProcess(config, **kw)
        started.append(d)
        return d

    yield start
    errors = []
    for d in started:
        if d.proc.poll() is None:
            try:
                code = d.stop()
                if code != 0:
                    errors.append(f"exit code {code}:\n{d.output}")
            except AssertionError as exc:
                errors.append(str(exc))
            finally:
                d.kill()
    assert not errors, errors


def budget_violations(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events at which the ledger committed more than the budget."""
    return [
        e for e in events if e.get("committed_bytes") is not None and e["committed_bytes"] > e["budget_bytes"]
    ]


def read_events(d: DaemonProcess) -> list[dict[str, Any]]:
    """Every event the daemon kept (its history), read from ``/v1/events?history=1``."""
    events = []
    with d.client() as c, c.stream("GET", "/v1/events", params={"history": "1"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        # The history comes first; stop at a marker event triggered after subscribing.
        marker = c.post("/v1/leases", json={"bytes": 1, "ttl_s": 5})
        assert marker.status_code == 200, marker.text
        lease_id = marker.json()["id"]
        assert c.delete(f"/v1/leases/{lease_id}").status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                e = json.loads(line[6:])
                events.append(e)
                if e["kind"] == "external_end" and e["model"] == marker.json()["model"]:
                    break
    return events
