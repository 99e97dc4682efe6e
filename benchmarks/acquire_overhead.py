"""Overhead of ``acquire()``/release on a model that is already resident.

What a lease costs when nothing has to switch: a single task doing N acquire/release cycles
on the resident model, with nothing else happening, beside two references measured in the
same run on the same event loop:

- a bare ``anyio.Lock`` acquire/release (uncontended: no other task runs);
- an ``anyio.Event`` round trip between two tasks (one wakes the other and waits for the
  answer). An acquire is at least this: the caller queues a waiter and waits; the
  scheduler task wakes, grants, and sets the waiter's event.

Then a contended variant: 50 tasks hammering acquire/release on the same resident model
(leases on one model are shared, so all can hold it at once), beside 50 tasks hammering one
``anyio.Lock`` (exclusive: not the same semantics, a reference only). Each figure is the
median over several repeats of (wall time / operations).

Run: ``python -m benchmarks.acquire_overhead [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from importlib import resources
from importlib.metadata import version
from typing import Any

import anyio
import yaml

from orchestrator import Orchestrator, parse_config
from orchestrator.config import DEFAULT_CONFIG_NAME, Config
from orchestrator.runtime import WAIT_SAMPLES

MODEL = "qwen-14b"
TIME_SCALE = 0.001  # the warm-up load takes 20 simulated s = 20 ms
CONTENDERS = 50

Op = Callable[[], Coroutine[Any, Any, None]]  # one measured operation batch


def make_config() -> Config:
    text = resources.files("orchestrator").joinpath("defaults", DEFAULT_CONFIG_NAME).read_text()
    raw = yaml.safe_load(text)
    raw.setdefault("simulation", {})["time_scale"] = TIME_SCALE
    return parse_config(yaml.safe_dump(raw), source=f"<benchmark: {DEFAULT_CONFIG_NAME}>")


async def timed(fn: Op) -> float:
    t0 = time.perf_counter_ns()
    await fn()
    return (time.perf_counter_ns() - t0) / 1e3  # microseconds


# -- the operations ------------------------------------------------------------------------------


def orch_cycles(orch: Orchestrator, n: int, waits: list[float]) -> Op:
    """``n`` acquire/release cycles; each lease's ``waited_s`` goes to ``waits``."""

    async def run() -> None:
        for _ in range(n):
            async with orch.acquire(MODEL) as lease:
                waits.append(lease.waited_s)

    return run


def lock_cycles(lock: anyio.Lock, n: int) -> Op:
    async def run() -> None:
        for _ in range(n):
            async with lock:
                pass

    return run


class _PingPong:
    def __init__(self) -> None:
        self.ping = anyio.Event()
        self.pong = anyio.Event()


def event_round_trips(n: int) -> Op:
    """``n`` round trips: this task sets ``ping`` and waits for ``pong`` from a responder task."""

    async def responder(pp: _PingPong) -> None:
        for _ in range(n):
            await pp.ping.wait()
            pp.ping = anyio.Event()
            pong, pp.pong = pp.pong, anyio.Event()
            pong.set()

    async def run() -> None:
        pp = _PingPong()
        async with anyio.create_task_group() as tg:
            tg.start_soon(responder, pp)
            await anyio.lowlevel.checkpoint()  # let the responder start waiting
            for _ in range(n):
                pong = pp.pong
                pp.ping.set()
                await pong.wait()

    return run


def contended(make: Callable[[], Op], tasks: int) -> Op:
    async def run() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(make())

    return run


# -- the run -------------------------------------------------------------------------------------


async def measure(fn: Op, ops: int, repeats: int) -> list[float]:
    """Per-operation microseconds of each repeat (after one unmeasured warm-up repeat)."""
    await fn()
    return [await timed(fn) / ops for _ in range(repeats)]


def line(name: str, per_op: list[float]) -> str:
    med = statistics.median(per_op)
    return f"  {name:<52}{med:>9.2f} us  (min {min(per_op):.2f}, max {max(per_op):.2f})"


def wait_line(waits: list[float]) -> str:
    """The leases' own ``waited_s`` (acquire called -> granted), over every measured cycle."""
    w = sorted(waits)
    q = statistics.quantiles(w, n=100, method="inclusive") if len(w) > 1 else w * 99
    return (
        f"    lease.waited_s over {len(w)} leases: p50 {q[49] * 1e6:.1f} us, p99 {q[98] * 1e6:.1f} us, "
        f"max {w[-1] * 1e6:.0f} us"
    )


async def main_async(args: argparse.Namespace) -> int:
    n = 2_000 if args.quick else 20_000
    per_task = 40 if args.quick else 400
    repeats = 5 if args.quick else 7
    print(
        f"acquire overhead: {'quick' if args.quick else 'full'} run; python {platform.python_version()}, "
        f"anyio {version('anyio')} (asyncio backend), {platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(f"per-operation microseconds, median of {repeats} repeats (after a warm-up repeat)")

    async with Orchestrator(make_config()) as orch:
        async with orch.acquire(MODEL) as lease:  # warm-up: the cold load
            loaded_in = lease.waited_s
        print(
            f"warm-up: {MODEL} loaded in {loaded_in * 1e3:.1f} ms real "
            f"({loaded_in / TIME_SCALE:.1f} simulated s); state {orch.state.name}"
        )
        switches_before = orch.statistics().switches

        lock = anyio.Lock()
        print(f"\nuncontended: one task, {n} cycles per repeat")
        solo_waits: list[float] = []
        orch_us = await measure(orch_cycles(orch, n, solo_waits), n, repeats)
        lock_us = await measure(lock_cycles(lock, n), n, repeats)
        event_us = await measure(event_round_trips(n), n, repeats)
        print(line(f"orchestrator acquire+release ({MODEL}, resident)", orch_us))
        print(wait_line(solo_waits))
        print(line("anyio.Lock acquire+release", lock_us))
        print(line("anyio.Event round trip between two tasks", event_us))
        o, lk, ev = (statistics.median(x) for x in (orch_us, lock_us, event_us))
        print(f"  ratio orchestrator / Lock: {o / lk:.1f}x; orchestrator / Event round trip: {o / ev:.1f}x")

        total = CONTENDERS * per_task
        print(
            f"\ncontended: {CONTENDERS} tasks x {per_task} cycles per repeat ({total} operations); "
            "wall time / operations"
        )
        many_waits: list[float] = []
        c_orch = await measure(
            contended(lambda: orch_cycles(orch, per_task, many_waits), CONTENDERS), total, repeats
        )
        c_lock = await measure(contended(lambda: lock_cycles(lock, per_task), CONTENDERS), total, repeats)
        print(line(f"orchestrator acquire+release ({MODEL}, shared)", c_orch))
        print(wait_line(many_waits))
        print(line("anyio.Lock acquire+release (exclusive)", c_lock))
        co, cl = statistics.median(c_orch), statistics.median(c_lock)
        print(
            f"  ratio orchestrator / Lock: {co / cl:.1f}x; "
            f"contended / uncontended orchestrator: {co / o:.1f}x"
        )

        stats_t0 = time.perf_counter_ns()
        stats = orch.statistics()
        stats_us = (time.perf_counter_ns() - stats_t0) / 1e3
        print(
            f"\nstatistics(): {stats.grants} grants, {stats.switches - switches_before} switches "
            f"during the measurements, {stats.timeouts} timeouts; one call took {stats_us:.0f} us "
            f"(percentiles over the latest {min(stats.waits.count, WAIT_SAMPLES)} "
            f"of {stats.waits.count} waits)"
        )
        bad = stats.switches != switches_before
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.acquire_overhead", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="fewer cycles and repeats (a few seconds)")
    args = p.parse_args(argv)
    return anyio.run(main_async, args)


if __name__ == "__main__":
    sys.exit(main())
