"""Overhead of the daemon's OpenAI-compatible gateway per request.

The same requests, side by side in one run, against the same server: once straight to the
model's server (the URL the daemon's lease hands out), once through the gateway
(``vram-orchestrator serve``), which resolves the model, takes a lease (the model is already
resident: no switch), proxies the request and releases the lease. The difference is what the
gateway costs. Measured for a plain completion and for a streamed one (time to the last
chunk), sequentially (one request at a time) so that the figures are latencies, not
throughput. Each figure is the median (and p90) over the requests of a repeat, after a warm-up.

By default the server is tests/fixtures/fake_openai_server.py (it answers at once, so the
overhead is not hidden under model time); ``--vllm MODEL_DIR`` serves a model with the real
vLLM CPU server instead (the flags of tests/integration/test_vllm.py).

Run: ``python -m benchmarks.gateway_overhead [--requests 200] [--vllm MODEL_DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
FAKE_SERVER = str(ROOT / "tests" / "fixtures" / "fake_openai_server.py")
LEAN = [
    "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4",
    "--enforce-eager", "--kv-cache-memory-bytes", "64M",
]  # fmt: skip


def config(vllm_model: str | None) -> dict[str, Any]:
    if vllm_model is None:
        backend: dict[str, Any] = {
            "type": "server", "served_model": "bench",
            "command": [sys.executable, FAKE_SERVER, "--port", "{port}", "--model", "{model}"],
        }  # fmt: skip
    else:
        backend = {
            "type": "vllm", "model": vllm_model, "served_model": "bench", "args": LEAN,
            "start_timeout_s": 300, "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        }  # fmt: skip
    return {
        "hardware": {"device": "simulated", "total_vram_gb": 16, "safe_max_vram_gb": 15.5},
        "switching": {"load_timeout_s": 400},
        "monitor": {"sample_hz": 0, "footprints_path": None},
        "models": {"bench-llm": {"kind": "llm", "vram_gb": 11.5, "backend": backend}},
    }


def start_daemon(config_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "serve", "--config", str(config_path), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.1)[0]:
            line = proc.stdout.readline().decode()
            if " on http" in line:
                return proc, line.split(" on ")[1].split()[0]
            if not line:
                break
    proc.kill()
    raise SystemExit("the daemon did not start")


def one(client: httpx.Client, url: str, body: dict[str, Any], stream: bool) -> float:
    t0 = time.perf_counter()
    if stream:
        with client.stream("POST", url, json=body) as r:
            r.raise_for_status()
            for _ in r.iter_bytes():
                pass
    else:
        r = client.post(url, json=body)
        r.raise_for_status()
    return (time.perf_counter() - t0) * 1e3


def measure(
    client: httpx.Client, base: str, model: str, n: int, stream: bool, max_tokens: int
) -> list[float]:
    body = {"model": model, "prompt": "one two three", "max_tokens": max_tokens, "stream": stream}
    url = f"{base}/v1/completions"
    for _ in range(max(3, n // 10)):  # warm-up
        one(client, url, body, stream)
    return [one(client, url, body, stream) for _ in range(n)]


def row(label: str, direct: list[float], gateway: list[float]) -> str:
    def p90(v: list[float]) -> float:
        return sorted(v)[int(0.9 * (len(v) - 1))]

    d50, g50 = statistics.median(direct), statistics.median(gateway)
    return (
        f"  {label:<22} {d50:>9.2f} {p90(direct):>9.2f}   {g50:>9.2f} {p90(gateway):>9.2f}   "
        f"{g50 - d50:>+9.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200, help="requests per figure (default 200)")
    p.add_argument("--vllm", metavar="MODEL_DIR", help="serve this model with the real vLLM CPU server")
    p.add_argument("--max-tokens", type=int, default=4)
    args = p.parse_args(argv)
    n = args.requests if args.vllm is None else min(args.requests, 30)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(json.dumps(config(args.vllm)))
        proc, gateway = start_daemon(path)
        try:
            with httpx.Client(timeout=600) as client:
                # Load the model through a lease, learn its server's URL, and keep it resident.
                lease = client.post(f"{gateway}/v1/leases", json={"model": "bench-llm", "ttl_s": 3600})
                lease.raise_for_status()
                direct = lease.json()["url"]
                client.delete(f"{gateway}/v1/leases/{lease.json()['id']}").raise_for_status()
                server = "vLLM CPU (" + Path(args.vllm).name + ")" if args.vllm else "fake OpenAI server"
                print(
                    f"gateway overhead, {server}; python {platform.python_version()}, "
                    f"starlette {version('starlette')}, uvicorn {version('uvicorn')}, "
                    f"httpx {version('httpx')}, {os.cpu_count()} CPUs"
                )
                print(f"milliseconds per request, {n} sequential requests each (after a warm-up)\n")
                print(f"  {'':<22} {'direct':>19}   {'through gateway':>19}   {'overhead':>9}")
                print(f"  {'':<22} {'p50':>9} {'p90':>9}   {'p50':>9} {'p90':>9}   {'p50':>9}")
                for stream in (False, True):
                    label = "streamed completion" if stream else "completion"
                    # Interleaved in halves, so that drift (caches, CPU clocks) hits both sides.
                    d1 = measure(client, direct, "bench", n // 2, stream, args.max_tokens)
                    g1 = measure(client, gateway, "bench-llm", n // 2, stream, args.max_tokens)
                    d2 = measure(client, direct, "bench", n - n // 2, stream, args.max_tokens)
                    g2 = measure(client, gateway, "bench-llm", n - n // 2, stream, args.max_tokens)
                    print(row(label, d1 + d2, g1 + g2))
                st = client.get(f"{gateway}/v1/status").json()
                print(
                    f"\nswitches during the measurement: {st['statistics']['switches'] - 1} "
                    f"(the model stayed resident); leases granted: {st['statistics']['grants']}"
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            if proc.stdout is not None:
                proc.stdout.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
