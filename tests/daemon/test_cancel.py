"""In-process work under a cancellation flag: a pipeline stops within one step of its task
being cancelled, and the task returns only once the pipeline has let go; speech is made in
pieces; the shutdown report says what could not be unloaded and why."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from orchestrator import Orchestrator, load_config
from orchestrator.backends.simulated import SimulatedBackend
from orchestrator.daemon.server import ShutdownReport, _close
from orchestrator.device.simulated import SimulatedDevice
from orchestrator.media import MediaCancelled, generate_image, speech_pieces, synthesize_speech
from tests.daemon.conftest import write_config

pytestmark = pytest.mark.anyio
PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("torch")

STEP_S = 0.02


class FakePipeline:
    """Calls ``callback_on_step_end`` after each step, as a diffusers pipeline does."""

    vram_orchestrator_steps = 2

    def __init__(self) -> None:
        self.steps_run = 0
        self.running = False
        self.vram_orchestrator_lock = threading.Lock()

    def __call__(self, *, num_inference_steps: int, callback_on_step_end: Any = None, **kw: Any) -> Any:
        self.running = True
        try:
            for i in range(num_inference_steps):
                time.sleep(STEP_S)
                self.steps_run += 1
                if callback_on_step_end is not None:
                    callback_on_step_end(self, i, 999 - i, {"latents": None})
            return SimpleNamespace(images=[PIL.new("RGB", (8, 8))])
        finally:
            self.running = False


async def test_a_cancelled_image_frees_the_pipeline_within_one_step() -> None:
    pipe = FakePipeline()
    t0 = anyio.current_time()
    with anyio.move_on_after(0.2) as scope:
        await generate_image(pipe, "a fox", steps=10_000)
    assert scope.cancelled_caught
    assert anyio.current_time() - t0 < 0.2 + 0.5  # not the 200 s the steps would take
    assert not pipe.running  # the task came back only once the pipeline had stopped
    assert 0 < pipe.steps_run < 100
    assert not pipe.vram_orchestrator_lock.locked()
    png = await generate_image(pipe, "a fox", steps=2)  # free for the next request at once
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


async def test_a_set_flag_stops_the_work_before_it_starts() -> None:
    pipe = FakePipeline()
    flag = threading.Event()
    flag.set()
    with pytest.raises(MediaCancelled):
        await generate_image(pipe, "a fox", steps=5, cancel=flag)
    assert pipe.steps_run == 0


class FakeSpeaker:
    def __init__(self) -> None:
        self.pieces: list[str] = []

    def synthesize(self, text: str, *, seed: int | None = None) -> tuple[Any, int]:
        import numpy as np

        time.sleep(STEP_S)
        self.pieces.append(text)
        return np.zeros(10 * len(text), dtype="float32"), 16000


async def test_speech_is_made_in_pieces_and_stops_between_them() -> None:
    text = "One sentence here. " * 100
    pieces = speech_pieces(text, limit=200)
    assert all(len(p) <= 200 for p in pieces) and len(pieces) > 5
    assert " ".join(pieces) == text.strip()
    assert speech_pieces("x" * 450, limit=200) == ["x" * 200, "x" * 200, "x" * 50]
    assert speech_pieces("Hello there!") == ["Hello there!"]
    assert speech_pieces("a" * 199 + ". !!!", limit=200) == ["a" * 199 + ". !!!"]
    speaker = FakeSpeaker()
    wav = await synthesize_speech(speaker, text)
    assert speaker.pieces == pieces and wav[:4] == b"RIFF"
    speaker = FakeSpeaker()
    with anyio.move_on_after(STEP_S * 2.5):
        await synthesize_speech(speaker, text * 10)
    assert 0 < len(speaker.pieces) < 10


async def test_the_shutdown_report_names_what_could_not_be_unloaded_and_why(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    orch = Orchestrator(config, device=SimulatedDevice(config.total_bytes))
    await orch.__aenter__()
    async with orch.acquire("sdxl"):
        pass
    async with orch.acquire("voice"):
        pass
    backend = orch.backends["sdxl-base"]
    assert isinstance(backend, SimulatedBackend)
    backend.faults.fail_unloads = 1000
    report = ShutdownReport()
    await _close(orch, report)
    assert report.unloaded == ["tts-small"] and list(report.left) == ["sdxl-base"]
    line = report.line()
    assert line.startswith("stopped; could not unload sdxl-base (10.50 GiB still on the gpu tier: ")
    assert "everything unloaded" not in line and line.endswith("unloaded tts-small")
    clean = ShutdownReport(unloaded=["a", "b"])
    assert clean.line() == "stopped; everything unloaded (unloaded a, b)"
    assert ShutdownReport().line() == "stopped; everything unloaded (nothing was loaded)"
