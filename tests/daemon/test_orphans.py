"""kill -9 of the daemon holding a server model, then a restart: no process of the old group
is left, and the new daemon serves on the same fixed ports (its own and the model's)."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.backends import children
from orchestrator.backends.server import free_port, live_processes
from tests.daemon.conftest import fake_server_model, write_config

pytestmark = pytest.mark.skipif(not children.supported(), reason="parent-death signals and /proc are Linux's")

ENGINE_RE = re.compile(r"engine child pid (\d+)")


def gone(pid: int) -> bool:
    return children.start_time(pid) is None


def group(pgid: int) -> list[int]:
    return [pid for pid, _, g in live_processes() if g == pgid]


def chat(d: Any) -> str:
    with d.client() as c:
        r = c.post(
            "/v1/chat/completions", json={"model": "llm", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["message"]["content"])


def test_kill_9_of_the_daemon_then_a_restart_reaps_the_old_servers_and_serves_on_the_same_ports(
    tmp_path: Path, start_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the daemons' state files
    model_port, daemon_port = free_port(), free_port()
    model = fake_server_model()
    model["backend"]["command"] += ["--child"]  # an engine child that ignores SIGTERM, as vLLM's
    model["backend"]["port"] = model_port
    config = write_config(tmp_path, models={"fake": model})
    first = start_daemon(config, extra=["--port", str(daemon_port)])
    assert first.url == f"http://127.0.0.1:{daemon_port}"
    try:
        assert chat(first) == "echo: hi"
        with first.client() as c:
            lease = c.post("/v1/leases", json={"model": "fake", "ttl_s": 60})
            assert lease.status_code == 200 and lease.json()["url"] == f"http://127.0.0.1:{model_port}"
        server = first.status()["models"][0]["server"]["pid"]
        engine = int(ENGINE_RE.findall((tmp_path / "logs" / "fake.log").read_text())[-1])
        assert not gone(server) and not gone(engine)
        first.watched.update({server, engine})  # killed at the end if the test fails

        os.kill(first.proc.pid, signal.SIGKILL)  # the daemon alone: its servers have sessions of their own
        first.proc.wait(timeout=10)
        assert not gone(engine)  # no parent-death signal reaches the engine child: it is an orphan now

        second = start_daemon(config, extra=["--port", str(daemon_port)])
        assert second.url == f"http://127.0.0.1:{daemon_port}"
        # The old group was reaped before the new daemon served anything (the engine child
        # ignores SIGTERM and got no parent-death signal: only the reaper's SIGKILL ends it).
        assert group(server) == [] and gone(server) and gone(engine)
        assert chat(second) == "echo: hi"  # a new server, on the same fixed port
        new = second.status()["models"][0]["server"]
        assert new["url"] == f"http://127.0.0.1:{model_port}" and new["pid"] != server
    finally:
        for pid in (p for p in first.watched if not gone(p)):
            os.kill(pid, signal.SIGKILL)
        assert first.proc.stdout is not None
        first.proc.stdout.close()
        deadline = time.monotonic() + 5
        while not all(gone(p) for p in first.watched) and time.monotonic() < deadline:
            time.sleep(0.05)
