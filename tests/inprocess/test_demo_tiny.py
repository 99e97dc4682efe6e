"""The demo, the README's main job, with the real tiny models: a real image and waveform."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
PIL = pytest.importorskip("PIL.Image")

ROOT = Path(__file__).resolve().parents[2]


def test_demo_writes_a_real_image_and_waveform(tmp_path: Path) -> None:
    out_dir = tmp_path / "demo"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "demo", "--out", str(out_dir), "--time-scale", "0.005"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # built on first use in the user's cache folder
    assert (tmp_path / "cache" / "vram-orchestrator" / "tiny-models" / "tiny-sdxl" / ".complete").exists()
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["real_models"] == ["sdxl-base", "gpt-sovits-small"]
    assert summary["images"] == ["agent-1.png", "agent-2.png", "agent-3.png"]
    assert summary["audio"] == ["agent-1.wav", "agent-2.wav", "agent-3.wav"]
    for name in summary["images"]:
        img = PIL.open(io.BytesIO((out_dir / name).read_bytes()))
        img.load()
        assert img.format == "PNG" and img.size == (64, 64)
        lo, hi = img.convert("L").getextrema()
        assert hi - lo > 16  # a drawn image, not a blank one
    for name in summary["audio"]:
        with wave.open(str(out_dir / name)) as w:
            assert w.getframerate() == 16000 and w.getnframes() > 1000
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int64)
        # Random weights make near-full-scale noise; the demo keeps it at -12 dBFS, unclipped.
        assert 0 < np.max(np.abs(pcm)) <= 8231
        assert np.sqrt(np.mean(pcm**2)) > 100  # still a real waveform, not silence
    assert "real tiny models     sdxl-base, gpt-sovits-small" in out.stdout
    assert "budget (within)" in out.stdout
    # Next to the files: why they are noise, and how to get real ones.
    lines = out.stdout.splitlines()
    note = lines[-2]
    assert note.startswith("  note: the tiny models have random weights: their images and speech are noise")
    assert "give --config a file whose sdxl and tts models point at real folders" in note
    assert summary["tiny_models"] == ["sdxl-base", "gpt-sovits-small"]
    assert "\r" not in out.stdout  # no progress line into a pipe


def test_the_demo_runs_the_models_of_a_config_that_points_at_model_folders(
    tmp_path: Path, tiny: dict[str, Path]
) -> None:
    """What the README tells a user with real models: a config whose sdxl and tts models are
    diffusers / tts folders; the demo uses them as they are (here, the tiny ones' folders)."""
    config = tmp_path / "my-models.yaml"
    config.write_text(
        f"""\
hardware: {{device: simulated, total_vram_gb: 16.0, safe_max_vram_gb: 15.5}}
simulation: {{time_scale: 0.005}}
models:
  qwen-14b: {{kind: llm, vram_gb: 11.5}}
  my-sdxl: {{kind: sdxl, vram_gb: 10.5, backend: {{type: diffusers, path: {tiny["tiny-sdxl"]}, steps: 2}}}}
  my-voice: {{kind: tts, vram_gb: 3.5, backend: {{type: tts, path: {tiny["tiny-tts"]}}}}}
"""
    )
    out_dir = tmp_path / "demo"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "demo",
            "--config",
            str(config),
            "--out",
            str(out_dir),
            "--agents",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["real_models"] == ["my-sdxl", "my-voice"]
    assert summary["images"] == ["agent-1.png", "agent-2.png"]
    assert summary["audio"] == ["agent-1.wav", "agent-2.wav"]
    transcript = (out_dir / "transcripts.txt").read_text()
    assert "a real PNG from my-sdxl" in transcript and "a real WAV from my-voice" in transcript
    assert "the real tiny models" not in out.stdout  # nothing was replaced


def test_demo_says_what_is_missing_when_tiny_models_are_asked_for(tmp_path: Path) -> None:
    # A folder that cannot be made: the error names it, no traceback.
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "demo",
            "--out",
            str(tmp_path / "d"),
            "--tiny-models",
            str(blocker / "sub"),
            "--time-scale",
            "0.005",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and str(blocker) in out.stderr
