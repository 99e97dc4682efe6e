"""On a real GPU: the demo (the README's main job) runs on the real device by itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_on_the_real_device(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    out_dir = tmp_path / "demo"
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "demo", "--out", str(out_dir), "--time-scale", "0.01"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    print(out.stdout[-3000:])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "the demo runs on the real device" in out.stdout
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["device"] in ("nvml", "torch")
    assert summary["images"] and summary["audio"]
    assert 0 < summary["peak_vram_bytes"] <= summary["budget_bytes"] + 2**30  # + the CUDA context
