"""The command line, run as a user runs it: a subprocess, exit codes, output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_plan_accepts_the_shipped_configs() -> None:
    for config in ["configs/simulated-16gb.yaml", "configs/rtx5080-16gb.yaml"]:
        out = run("plan", "--config", config)
        assert out.returncode == 0, out.stderr
        assert "budget 15.50 GiB of 16.00 GiB" in out.stdout
        assert "qwen-14b" in out.stdout and "11.50 GiB" in out.stdout
        assert out.stdout.rstrip().endswith("groups are consistent")


def test_plan_reports_a_bad_config_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "hardware: {safe_max_vram_gb: 15.5, total_vram_gb: 16}\n"
        "models:\n  big: {kind: sdxl, vram_gb: 16}\n"
    )
    out = run("plan", "--config", str(bad))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"{bad}: models.big.vram_gb" in lines[0]
    assert "larger than the whole budget" in lines[0] and "short 0.50 GiB" in lines[0]


def test_plan_lists_problems_of_a_config_that_parses(tmp_path: Path) -> None:
    cfg = tmp_path / "nodefault.yaml"
    cfg.write_text(
        "hardware: {safe_max_vram_gb: 15.5}\n"
        "models:\n  a: {kind: llm, vram_gb: 10}\n  b: {kind: llm, vram_gb: 11}\n"
    )
    out = run("plan", "--config", str(cfg))
    assert out.returncode == 1
    assert "defaults.llm" in out.stderr and "no default" in out.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    out = run("--debug", "plan", "--config", str(tmp_path / "missing.yaml"))
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "ConfigError" in out.stderr


def test_missing_config_file() -> None:
    out = run("plan", "--config", "no/such.yaml")
    assert out.returncode == 1
    assert "no/such.yaml: file not found" in out.stderr


def test_demo_end_to_end(tmp_path: Path) -> None:
    out_dir = tmp_path / "demo"
    out = run("demo", "--out", str(out_dir), "--time-scale", "0.005", "--agents", "4")
    assert out.returncode == 0, out.stderr
    assert "switching:" in out.stdout and "now LLM_ACTIVE" in out.stdout
    assert "budget (within)" in out.stdout
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["agents"] == 4
    assert summary["leases"] == 16  # four steps per agent
    assert summary["switches"] >= 3  # LLM, SDXL, back to the LLM at least
    assert 0 < summary["peak_vram_bytes"] <= summary["budget_bytes"]
    events = [json.loads(line) for line in (out_dir / "events.jsonl").read_text().splitlines()]
    transitions = [e for e in events if e["kind"] == "transition"]
    assert transitions and transitions[-1]["to_state"] == "IDLE"
    assert sum(1 for e in events if e["kind"] == "grant") == 16
    transcript = (out_dir / "transcripts.txt").read_text()
    assert transcript.count("review [qwen-14b]") == 4


@pytest.mark.slow
def test_check_explores_a_config() -> None:
    out = run("check", "--config", "configs/simulated-16gb.yaml", "--examples", "5", "--steps", "10")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("ok: no sequence passed the budget")


def test_check_finds_footprints_larger_than_the_estimates() -> None:
    """True footprints 1.5x the estimates: the simulated device passes the budget, and check says so."""
    out = run("check", "--examples", "20", "--steps", "10", "--footprint-factor", "1.5")
    assert out.returncode == 1
    assert "FAILED" in out.stdout and "budget" in out.stdout
