"""Layering: ``import orchestrator`` stays light, and ``states`` stays pure."""

from __future__ import annotations

import subprocess
import sys


def modules_after(statement: str) -> set[str]:
    code = f"{statement}; import sys; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return set(out.stdout.split())


def test_import_orchestrator_does_not_import_heavy_dependencies() -> None:
    mods = modules_after("import orchestrator")
    heavy = {"torch", "diffusers", "transformers", "vllm", "hypothesis", "numpy"}
    assert not heavy & {m.split(".")[0] for m in mods}


def test_states_imports_no_io_library() -> None:
    mods = {m.split(".")[0] for m in modules_after("import states")}
    assert not {"anyio", "httpx", "yaml", "torch", "orchestrator", "asyncio", "socket"} & mods
    assert "transitions" in mods  # the pure FSM library is the one dependency


def test_python_dash_m_orchestrator_is_the_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    for command in ("demo", "plan", "check"):
        assert command in out.stdout
