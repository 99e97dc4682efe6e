"""``python -m benchmarks.gateway_overhead`` with its concurrency mode and two ``--peer``s (a
second daemon in front of the same server, and the built-in TCP relay), run small as CI runs it
(a subprocess): its JSON has the shape the report promises, every side answered every request
(streamed answers included, through a relay that does not read them), and the proxies' CPU per
request was read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

PEER = """
import json, os, sys
port, upstream, config_dir = sys.argv[1:4]
path = os.path.join(config_dir, "peer.json")
with open(path, "w") as f:
    json.dump({
        "hardware": {"device": "simulated", "total_vram_gb": 16, "safe_max_vram_gb": 15.5},
        "monitor": {"sample_hz": 0, "footprints_path": None},
        "models": {"bench-llm": {"kind": "llm", "vram_gb": 11.5, "max_concurrent": 8,
            "backend": {"type": "server", "served_model": "bench", "base_url": upstream}}},
    }, f)
os.execv(sys.executable, [sys.executable, "-m", "orchestrator", "serve", "--config", path, "--port", port])
"""


def test_the_concurrency_mode_and_a_peer_are_measured_side_by_side(tmp_path: Path) -> None:
    peer = tmp_path / "peer.py"
    peer.write_text(PEER)
    out = tmp_path / "out.json"
    cmd = f"{sys.executable} {peer} {{port}} {{upstream}} {{config_dir}}"
    args = [
        "--requests", "12", "--clients", "4", "--load-requests", "48", "--rounds", "2",
        "--peer", cmd, "--peer-label", "second daemon", "--peer", "relay", "--peer-label", "TCP relay",
        "--json", str(out), "--cpu-probe",
    ]  # fmt: skip
    pin = len(os.sched_getaffinity(0)) >= 2
    args += ["--pin"] if pin else []
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gateway_overhead", *args],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "4 concurrent clients" in proc.stdout
    assert "fake OpenAI server (fast)" in proc.stdout  # the asyncio upstream, by default
    result: dict[str, Any] = json.loads(out.read_text())
    assert result["clients"] == 4
    sides = result["sides"]
    assert list(sides) == ["direct", "gateway", "second daemon", "TCP relay"]
    for label, side in sides.items():
        for kind in ("completion", "streamed"):
            assert side[kind]["n"] == 12, (label, kind)
            assert 0 < side[kind]["p50_ms"] <= side[kind]["p90_ms"]
        conc = side["concurrent"]
        assert conc["requests"] == 48, label
        assert conc["req_per_s"] > 0 and len(conc["req_per_s_rounds"]) == 2
        assert len(conc["p99_over_p50_rounds"]) == 2 and min(conc["p99_over_p50_rounds"]) >= 1
        assert 0 < conc["p50_ms"] <= conc["p99_ms"]
        if label == "direct":
            assert "cpu_per_request_ms" not in conc
            assert side["completion"]["overhead_p50_ms"] == 0
        else:
            # the proxy's own process group did work for each request
            assert conc["cpu_per_request_ms"] > 0, label
            assert side["sequential_cpu_per_request_ms"] > 0, label
    # the gateway granted a lease per proxied request (warm-ups and the resident lease included)
    proxied = sum(sides["gateway"][k]["n"] for k in ("completion", "streamed"))
    assert result["gateway_grants"] >= proxied + sides["gateway"]["concurrent"]["requests"]
    assert result["gateway_switches"] == 1
    # --cpu-probe: every CPU's speed was sampled, and each round of each side read from it
    cpus = sorted(os.sched_getaffinity(0))
    assert sorted(int(c) for c in result["cpu_probe_full_speed_us"]) == cpus
    assert all(us > 0 for us in result["cpu_probe_full_speed_us"].values())
    for label, side in sides.items():
        shares = side["concurrent"]["cpu_slow_share_rounds"]
        assert sorted(int(c) for c in shares) == cpus, label
        for per_round in shares.values():
            assert len(per_round) == 2 and all(x is None or 0 <= x <= 1 for x in per_round), label
    assert "the machine's own speed (--cpu-probe)" in proc.stdout
    # --pin: the proxies on the last CPU, the load generator apart from them
    last = max(os.sched_getaffinity(0))
    if not pin:
        return
    assert (
        result["cpus"]["gateway"] == result["cpus"]["second daemon"] == result["cpus"]["TCP relay"] == [last]
    )
    assert last not in result["cpus"]["load generator"]


def test_the_cpu_probe_counts_the_samples_that_ran_slow() -> None:
    from benchmarks.cpu_probe import full_speed_s, slow_share

    # ten samples at full speed (40 us) and, from t=10 on, five at half speed
    samples = [(float(t), 40e-6) for t in range(10)] + [(float(t), 80e-6) for t in range(10, 15)]
    full = full_speed_s(samples)
    assert full == 40e-6
    assert slow_share(samples, 0, 9, full) == 0
    assert slow_share(samples, 10, 14, full) == 1
    assert slow_share(samples, 5, 14, full) == 0.5
    assert slow_share(samples, 20, 30, full) is None  # no sample in the window
