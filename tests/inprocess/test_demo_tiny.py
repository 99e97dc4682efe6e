"""The demo, the README's main job, with the real tiny models: a real image and waveform."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import wave
from pathlib import Path

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
    assert "real tiny models     sdxl-base, gpt-sovits-small" in out.stdout
    assert "budget (within)" in out.stdout


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
