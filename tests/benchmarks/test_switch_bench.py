"""``python -m benchmarks.switch_gpu --cpu``: the tiny SDXL through the real diffusers backend on
the simulated device, run as CI runs it (a subprocess), its JSON figures checked."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("switch-bench")
    out = tmp / "out.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.switch_gpu", "--cpu", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "checks: all passed" in proc.stdout
    # the default work dir (a temp dir) is removed at the end
    assert not [p for p in tmp.iterdir() if p.name.startswith("switch-gpu-")]
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def test_every_phase_is_timed(figures: dict[str, Any]) -> None:
    names = [p["phase"] for p in figures["phases"]]
    assert names[0] == "load" and names[-1] == "drop"
    assert "offload 1" in names and "restore 1" in names and "restore 2" in names
    for p in figures["phases"]:
        assert p["seconds"] > 0 and math.isfinite(p["seconds"]), p
    for p in figures["phases"]:
        if p["phase"].startswith("restore") or p["phase"] == "load":
            assert p["copy_s"] > 0 and p["gbps"] > 0, p
    assert figures["link"]["best_s"] > 0 and figures["link"]["verified"]
    assert figures["per_tensor"]["best_s"] > 0 and figures["per_tensor"]["tensors"] > 100
    assert figures["pageable"] is None  # no separate pageable figure on the CPU
    assert figures["summary"]["restore_best_of_link"] > 0


def test_restores_are_restores(figures: dict[str, Any]) -> None:
    backend = figures["backend"]
    restores = [p for p in figures["phases"] if p["phase"].startswith("restore")]
    assert backend["loads"] == 1
    assert backend["restores"] == len(restores) >= 1
    assert backend["offloads"] == len(restores)
    # a restore is the host copy coming back, not a second load from disk
    assert "restore_copy_s" in backend["timings"] and "pack_s" in backend["timings"]


def test_forward_identical_after_restore(figures: dict[str, Any]) -> None:
    checks = [f for f in figures["forward"] if "identical" in f]
    assert len(checks) == figures["backend"]["restores"]
    for f in checks:
        assert f["identical"] and f["max_abs_diff"] == 0.0 and f["finite_fraction"] == 1.0, f


def test_offload_releases_the_stand_in(figures: dict[str, Any]) -> None:
    stand_in = figures["backend"]["stand_in_bytes"]
    assert stand_in and stand_in > 10 * 2**30  # the full-size model's bytes, not the tiny one's
    assert figures["variant"] == "cpu" and figures["device_source"] == "simulated"
    for p in figures["phases"]:
        if p["phase"] == "load" or p["phase"].startswith("restore"):
            assert p["used_after"] - p["used_before"] == stand_in, p
        else:  # offloads and the drop
            assert p["released_bytes"] == stand_in and p["used_after"] == 0, p
    assert figures["packed_bytes"] > 0
    assert all(figures["summary"]["checks"].values()) and figures["summary"]["ok"]
