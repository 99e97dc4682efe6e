"""The Model Management Module's API: its Examples 1 and 4 run with only the import line changed."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import threading

import anyio
import anyio.lowlevel
import pytest

from orchestrator import ModelManager, Orchestrator, State, UnknownModel
from orchestrator.config import load_config
from tests.fixtures.design_examples import EXAMPLE_3


def fast_manager() -> ModelManager:
    """The embedded config with its simulated latencies 10x shorter again."""
    return ModelManager(orchestrator=Orchestrator(dataclasses.replace(load_config(None), time_scale=0.005)))


EXAMPLE_4 = """
from orchestrator import ModelManager

manager = ModelManager()

# TTS is lightweight (3-4GB), can run when LLM is stopped
with manager.use_tts() as tts:
    # TTS model loaded (placeholder for now)
    # In Module 3, this will be:
    # audio = tts.synthesize(text="Hello, my name is Luca!")
    print("TTS model ready")

manager.cleanup()
"""


def test_example_3_runs_as_written_and_exits_without_cleanup() -> None:
    """The Model Management Module's Example 3 (plus a status line); it never calls cleanup(),
    and the process still exits at once: the manager unloads at exit through its daemon loop."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EXAMPLE_3)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0:4] == [
        "Checking LLM status...",
        "LLM is not running",
        "Starting LLM backend...",
        "LLM started successfully",
    ]
    assert lines[4] == "Running: True pid: None url: None VRAM: 11.5 GB"  # simulated: no process
    assert lines[-1] == "LLM stopped, VRAM freed"


def test_example_4_runs_as_written() -> None:
    """The Model Management Module's Example 4, only its import line changed, in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EXAMPLE_4)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "TTS model ready"
    # cleanup() stopped the background loop: the process exited without hanging on a thread


class LLMClient:
    """Stands in for the module's scripts.core.llm_client.LLMClient (not part of this project)."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def chat(self, messages: list[dict[str, str]]) -> dict[str, object]:
        # The LLM must be resident while the client talks to it.
        assert self.manager.state is State.LLM_ACTIVE
        await anyio.lowlevel.checkpoint()
        return {"choices": [{"message": {"content": f"re: {messages[-1]['content']}"}}]}


def test_example_1_model_manager_calls_work_as_written() -> None:
    """Example 1's calls: a sync ``with`` inside a coroutine, around an ``async with`` client."""
    manager = ModelManager(orchestrator=Orchestrator(load_config(None)))
    seen: list[tuple[str, State]] = []

    async def example_1() -> None:
        # Step 1: Use LLM for intent analysis
        with manager.use_llm(model="qwen-14b"):
            async with LLMClient(manager) as client:
                response = await client.chat(
                    messages=[{"role": "user", "content": "Generate an image of Luca running on the beach"}]
                )
                prompt = response["choices"][0]["message"]["content"]  # type: ignore[index]
                seen.append(("llm", manager.state))

        # Step 2: Switch to SDXL for image generation
        with manager.use_sdxl() as pipeline:
            seen.append(("sdxl", manager.state))
            assert pipeline is not None and pipeline.name == "sdxl-base"
            assert manager.ledger().on_gpu("sdxl-base") and not manager.ledger().on_gpu("qwen-14b")

        # Step 3: Switch back to LLM for quality evaluation
        with manager.use_llm():
            async with LLMClient(manager) as client:
                await client.chat(messages=[{"role": "user", "content": f"Evaluate {prompt}"}])
                seen.append(("llm", manager.state))

        manager.cleanup()

    anyio.run(example_1)
    assert seen == [("llm", State.LLM_ACTIVE), ("sdxl", State.SDXL_ACTIVE), ("llm", State.LLM_ACTIVE)]
    assert manager.state is State.IDLE
    assert manager.get_status()["running"] is False


async def test_async_with_on_model_manager() -> None:
    manager = fast_manager()
    try:
        async with manager.use_tts() as tts:
            assert tts.kind == "tts"
            assert manager.state in (State.TTS_ACTIVE,)
        async with manager.use_llm() as llm:
            assert llm.name == "qwen-14b"
            # TTS (3.5) rides along with the LLM (11.5) within 15.5 GiB; the heavy model names the state
            assert manager.state is State.LLM_ACTIVE
            assert manager.ledger().on_gpu("gpt-sovits-small")
    finally:
        await anyio.to_thread.run_sync(manager.cleanup)
    assert manager.state is State.IDLE


def test_model_manager_from_threads_shares_one_orchestrator() -> None:
    """Sync callers in several threads: leases on one model are shared, never over budget."""
    manager = fast_manager()
    errors: list[BaseException] = []

    def worker(kind: str) -> None:
        try:
            for _ in range(3):
                with manager.use(kind):
                    assert manager.ledger().committed_bytes <= manager.ledger().budget_bytes
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in ["llm", "sdxl", "tts", "llm"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stats = manager.orchestrator.statistics()
    manager.cleanup()
    assert not errors
    assert stats.grants == 12
    assert stats.peak_committed_bytes <= manager.ledger().budget_bytes


def test_unknown_model_fails_in_the_caller_without_starting_anything() -> None:
    manager = ModelManager()
    with pytest.raises(UnknownModel, match="qwen-99b"):
        manager.use_llm(model="qwen-99b")
    assert manager.get_status()["running"] is False


def test_a_context_cannot_be_entered_twice() -> None:
    manager = ModelManager()
    use = manager.use_tts()
    try:
        with use, pytest.raises(RuntimeError, match="already entered"):
            use.__enter__()
    finally:
        manager.cleanup()
