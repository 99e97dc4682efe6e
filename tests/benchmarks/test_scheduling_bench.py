"""``python -m benchmarks.scheduling --quick --trace mixed``: run as CI runs it (a subprocess),
twice; its JSON has the shape the report promises and the same figures both times (the
virtual clock makes a run exact: two processes, two hash seeds, one result)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("trio")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MODES = {"fair", "fcfs", "resident_first"}
FIGURES = {"switches", "makespan_s", "mean_wait_s", "p99_wait_s", "max_wait_s"}


def run_bench(out: Path) -> tuple[str, dict[str, Any]]:
    args = ["--quick", "--trace", "mixed", "--seeds", "1", "--stays", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scheduling", *args],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    data: dict[str, Any] = json.loads(out.read_text())
    return proc.stdout, data


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[tuple[str, dict[str, Any]], ...]:
    tmp = tmp_path_factory.mktemp("scheduling-bench")
    return run_bench(tmp / "a.json"), run_bench(tmp / "b.json")


def test_same_seed_same_figures(two_runs: tuple[tuple[str, dict[str, Any]], ...]) -> None:
    (out_a, a), (out_b, b) = two_runs
    assert a == b
    # the printed tables too, but for the wall time
    strip = [line for line in out_a.splitlines() if "wall time" not in line]
    assert strip == [line for line in out_b.splitlines() if "wall time" not in line]


def test_every_run_is_there_and_served(two_runs: tuple[tuple[str, dict[str, Any]], ...]) -> None:
    (_, data), _ = two_runs
    runs = data["runs"]
    assert {(r["costs"], r["mode"]) for r in runs} == {(c, m) for c in ("design", "fast") for m in MODES}
    for r in runs:
        assert r["trace"] == "mixed" and r["seed"] == 1
        assert not r["errors"] and not r["stalled"] and r["unfinished"] == 0, r["mode"]
        assert len(r["waits_s"]) == len(r["lease_waits_s"]) == r["requests"] == r["stats_waits"]
        assert all(w >= 0 and math.isfinite(w) for w in r["waits_s"])
        # a wait measured outside includes the lease's own (the queue inside it comes on top)
        assert all(w >= lw - 1e-9 for w, lw in zip(r["waits_s"], r["lease_waits_s"], strict=True))
        assert r["makespan_s"] > 0 and r["peak_committed_bytes"] <= r["budget_bytes"]
        # the first loads onto the empty GPU are loads, not switches
        assert r["loads"] + r["restores"] >= r["switches"] + 2
        assert r["stats_switches"] >= r["switches"]
        assert set(r["max_leases"]) == {"llm", "sdxl", "tts"} and all(
            n >= 1 for n in r["max_leases"].values()
        )


def test_the_stays_on_the_gpu_account_for_each_load(two_runs: tuple[tuple[str, dict[str, Any]], ...]) -> None:
    (stdout, data), _ = two_runs
    for r in data["runs"]:
        stays = r["stays"]
        # each load or restore begins a stay; an eviction, at the latest the shutdown's, ends it
        assert len(stays) == r["loads"] + r["restores"], r["mode"]
        assert all(length > 0 and at >= 0 for _, at, length in stays)
        assert [at for _, at, _ in stays] == sorted(at for _, at, _ in stays)
        # the LLM and SDXL do not fit the card together: their stays never overlap
        heavy = [(at, at + length) for model, at, length in stays if model in ("qwen-14b", "sdxl-base")]
        assert all(end <= nxt + 1e-9 for (_, end), (nxt, _) in itertools.pairwise(heavy)), r["mode"]
        assert f"stays on the GPU, {r['mode']}, seed 1 ({r['switches']} switches)" in stdout


def test_the_summary_gives_means_and_ratios(two_runs: tuple[tuple[str, dict[str, Any]], ...]) -> None:
    (stdout, data), _ = two_runs
    assert data["capacity"] == {"llm": 8, "sdxl": 1, "tts": 1}
    assert [(s["trace"], s["costs"]) for s in data["summary"]] == [("mixed", "design"), ("mixed", "fast")]
    for s in data["summary"]:
        assert set(s["modes"]) == MODES and s["seeds"] == [1]
        for m, f in s["modes"].items():
            assert FIGURES <= set(f)
            run = next(r for r in data["runs"] if r["costs"] == s["costs"] and r["mode"] == m)
            assert f["switches"] == run["switches"] and f["max_wait_s"] == max(run["waits_s"])
        assert set(s["ratios"]) == {"fair/resident_first", "fair/fcfs"}
        for other, rs in s["ratios"].items():
            base = s["modes"][other.split("/")[1]]
            assert rs["makespan_s"] == pytest.approx(s["modes"]["fair"]["makespan_s"] / base["makespan_s"])
    # design costs are slower than fast ones: the same requests take longer
    design, fast = data["summary"]
    assert design["modes"]["fcfs"]["makespan_s"] > fast["modes"]["fcfs"]["makespan_s"]
    assert "== mixed at design switch costs" in stdout and "== mixed at fast switch costs" in stdout
    assert "fair/resident_first" in stdout and "fair/fcfs" in stdout
