"""The vLLM backend's logic that runs without vLLM: config checks, the command it builds,
the shared-memory cleanup. (Against a real vLLM: tests/integration/test_vllm.py.)"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from orchestrator import ConfigError, Orchestrator, parse_config
from orchestrator.backends.vllm import VllmBackend, remove_stale_shm

BASE = """
hardware: {{device: simulated, safe_max_vram_gb: 15.5}}
models:
  llm: {{kind: llm, vram_gb: 11.5, backend: {backend}}}
"""


def orch_with(backend: str) -> Orchestrator:
    return Orchestrator(parse_config(BASE.format(backend=backend), source="<t>"))


@pytest.mark.parametrize(
    ("backend", "key", "says"),
    [
        ("{type: vllm}", "models.llm.backend.model", "local path"),
        ("{type: vllm, model: /m, sleep_level: 3}", "models.llm.backend.sleep_level", "1 or 2"),
        ("{type: vllm, model: /m, args: --x}", "models.llm.backend.args", "list of strings"),
        ("{type: vllm, model: /m, command: [x]}", "models.llm.backend.command", "builds its own command"),
        ("{type: vllm, model: /m, stop_grace_s: 0}", "models.llm.backend.stop_grace_s", "positive"),
    ],
)
def test_vllm_config_errors_name_the_key(backend: str, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE.format(backend=backend), source="<t>")
    assert info.value.key == key
    assert says in str(info.value)


def test_the_command_and_environment() -> None:
    b = orch_with(
        "{type: vllm, model: /models/q, served_model: q14, sleep_level: 1, args: [--dtype, float32]}"
    )
    v = b.backends["llm"]
    assert isinstance(v, VllmBackend)
    cmd = list(v.options.command or ())
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == "/models/q"
    assert cmd[cmd.index("--served-model-name") + 1] == "q14"
    assert v.options.served_model == "q14"
    env = v.options.env or {}
    assert env["VLLM_SERVER_DEV_MODE"] == "1"  # the sleep endpoints need it
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"
    assert v.supports_host_tier  # sleep_level given
    assert not orch_with("{type: vllm, model: /models/q}").backends["llm"].supports_host_tier


def test_stale_shared_memory_is_removed_but_not_what_is_in_use(tmp_path: Path) -> None:
    since = time.time()
    stale = tmp_path / "psm_dead"
    held = tmp_path / "psm_alive"
    other = tmp_path / "someone_elses"
    for p in (stale, held, other):
        p.write_bytes(b"x")
    old = tmp_path / "psm_old"
    old.write_bytes(b"x")
    os.utime(old, (since - 3600, since - 3600))  # from before the server started
    with held.open("rb"):
        removed = remove_stale_shm(since=since, shm=tmp_path)
    assert removed == ["psm_dead"]
    assert not stale.exists() and held.exists() and other.exists() and old.exists()
