"""How fast one CPU runs over time, seen through a fixed piece of work.

On a virtual machine a vCPU can run at half its speed for seconds at a time while the host's
other tenants are busy (seen on a 2-core VM: a spin loop's rate fell to 0.5 of its best for
2 s on one vCPU while the other kept its speed; the guest's steal time did not move). A
saturated proxy's latencies follow that speed one for one, so a benchmark's tail can be the
machine's rather than the program's. This probe shows which: pinned to one CPU, every
``--period-s`` (10 ms) it times a short busy loop (about 30 us at full speed; the least of
three runs back to back, so it takes about 1% of the CPU it watches) and records
``(time.monotonic(), seconds)``. On SIGTERM it writes the records as JSON to ``--out`` and
exits.

``slow_share`` reads them: the share of a window's samples that took at least 1.5x the
probe's full-speed time (its 10th percentile over the whole run).

Run: ``python -m benchmarks.cpu_probe --cpu 1 --out samples.json`` (``benchmarks.
gateway_overhead --cpu-probe`` starts one per CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

SLOW = 1.5  # a sample this many times the full-speed time counts as slow
WORK = 2000  # additions per run of the work
REPEATS = 3  # runs per sample


def _work() -> int:
    x = 0
    for i in range(WORK):
        x += i
    return x


def _timed() -> float:
    """The work's time, the least of ``REPEATS`` runs back to back: a run that an interrupt or
    the other programs' cache traffic slowed is not the CPU's speed."""
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        _work()
        best = min(best, time.perf_counter() - t0)
    return best


def full_speed_s(samples: list[tuple[float, float]]) -> float:
    """The probe's time at full speed: the 10th percentile of every sample's."""
    d = sorted(s for _, s in samples)
    return d[len(d) // 10] if d else 0.0


def slow_share(samples: list[tuple[float, float]], t0: float, t1: float, full_s: float) -> float | None:
    """The share of the samples taken in ``[t0, t1]`` that took ``SLOW`` times ``full_s`` or
    more; ``None`` when there are none."""
    window = [s for t, s in samples if t0 <= t <= t1]
    if not window or full_s <= 0:
        return None
    return sum(s >= SLOW * full_s for s in window) / len(window)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", type=int, required=True, help="the CPU to watch (the probe pins itself to it)")
    p.add_argument("--out", required=True, help="where the samples go, as JSON, on SIGTERM")
    p.add_argument("--period-s", type=float, default=0.01, help="time between samples (default 0.01)")
    args = p.parse_args(argv)
    os.sched_setaffinity(0, {args.cpu})
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    samples: list[tuple[float, float]] = []
    next_s = time.monotonic()
    while not stopping:
        samples.append((time.monotonic(), _timed()))
        next_s += args.period_s
        wait_s = next_s - time.monotonic()
        if wait_s > 0:
            time.sleep(wait_s)
        else:  # descheduled past the next sample's time: start again from now
            next_s = time.monotonic()
    Path(args.out).write_text(json.dumps(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
