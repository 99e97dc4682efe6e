"""``python -m benchmarks.cold_load --tiny``: the three cold loads of the tiny SDXL, run as CI
runs it (a subprocess), its JSON figures checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_the_tiny_cold_load_benchmark_reports_the_three_loads(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.cold_load",
            str(tmp_path / "scratch"),
            "--tiny",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(out.read_text())
    assert report["bytes"] > 0 and report["bytes"] % 256 == 0
    for load in ("source", "packed", "packed_read", "packed_noverify", "raw", "raw_map", "ceiling"):
        for temp in ("cold", "warm"):
            (seconds,) = report["seconds"][load][temp]
            assert seconds > 0
    assert set(report["ratios"]) == {"cold", "warm"}
    assert set(report["goals"]) == {"packed_cold_at_80pct_of_raw", "packed_cold_3x_source"}
    assert "POSIX_FADV_DONTNEED" in report["page_cache"]
    assert report["seconds"]["ceiling"]["cold"][0] == min(
        report["seconds"]["raw"]["cold"][0], report["seconds"]["raw_map"]["cold"][0]
    )
    assert len(report["resident_after_drop_bytes"]) == 5  # checked after each cold load's drop
    assert "goals (cold)" in proc.stdout
