"""Scheduling benchmark: the real Orchestrator on the simulated GPU, in its three modes.

Each trace is a fixed, seeded list of requests; every mode replays the same traces on a fresh
Orchestrator built from the embedded default config (the design document's 16 GiB card and
models), with all simulated latencies multiplied by ``--time-scale``. Times are printed in
*simulated* seconds (real seconds / time scale), so that they read as on the real card.

Traces:

``interleaved``
    16 agents, each looping through the design document's Example 1 (LLM plans, SDXL draws,
    TTS speaks, LLM reviews), with a work time per step and small random think times.
``bursts``
    Open-loop bursts of requests for one model, then for another (LLM, SDXL, sometimes TTS):
    a burst every 40 s, its requests spread over 50 s, so each burst's tail overlaps the next.
``hot``
    Heavy, continuous LLM traffic (closed-loop clients that rarely all pause at once) and an
    occasional SDXL request. ``resident_first`` never switches while the LLM has a lease, so
    SDXL waits for the LLM traffic to end; ``fair`` bounds its wait by ``fairness_s`` plus
    the switch.

Leases on one model are shared, but the GPU work inside them is limited per kind
(``CONCURRENCY``: an LLM server batches 8 requests, SDXL draws one image at a time, TTS speaks
one line at a time); a lease queued for its turn still holds its model.

Run: ``python -m benchmarks.scheduling [--quick] [--time-scale X] [--seed N] [--trace NAME]``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.metadata import version

import anyio
import yaml

from orchestrator import Orchestrator, OrchestratorError, parse_config
from orchestrator.config import DEFAULT_CONFIG_NAME, Config

MODES = ("fair", "fcfs", "resident_first")
KINDS = ("llm", "sdxl", "tts")

# Scheduler bounds, in simulated seconds (scaled by the time scale like every latency).
FAIRNESS_S = 10.0
MAX_WAIT_S = 120.0
# A run that has not finished after this many simulated seconds is stopped and reported.
STALL_LIMIT_S = 10_000.0
# How many leases of a kind do GPU work at once: an LLM server batches requests, an SDXL
# pipeline draws one image at a time, a TTS model speaks one line at a time. A lease waiting
# for its turn still holds the model (as a request queued inside a server does).
CONCURRENCY = {"llm": 8, "sdxl": 1, "tts": 1}


# -- traces --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """Sleep ``think_s``, then acquire ``model`` and hold it for ``work_s`` (simulated s)."""

    think_s: float
    model: str
    work_s: float


@dataclass(frozen=True)
class Trace:
    name: str
    description: str
    agents: tuple[tuple[Step, ...], ...]  # each agent runs its steps in order

    @property
    def requests(self) -> int:
        return sum(len(a) for a in self.agents)


def interleaved_agents(rng: random.Random, agents: int, loops: int) -> Trace:
    """Example 1 of the design document, looped by several agents at once."""
    out = []
    for _ in range(agents):
        steps: list[Step] = []
        for i in range(loops):
            first_think = rng.uniform(0.0, 2.0) if i == 0 else rng.uniform(0.0, 1.0)
            steps += [
                Step(first_think, "llm", rng.uniform(2.0, 4.0)),  # plan the image
                Step(rng.uniform(0.0, 1.0), "sdxl", rng.uniform(6.0, 10.0)),  # draw it
                Step(rng.uniform(0.0, 1.0), "tts", rng.uniform(1.5, 2.5)),  # speak the caption
                Step(rng.uniform(0.0, 1.0), "llm", rng.uniform(1.5, 2.5)),  # review the result
            ]
        out.append(tuple(steps))
    return Trace(
        "interleaved",
        f"{agents} agents x {loops} loops of LLM plan -> SDXL draw -> TTS speak -> LLM review",
        tuple(out),
    )


def bursts(
    rng: random.Random, n_bursts: int, per_burst: int, every_s: float = 40.0, spread_s: float = 50.0
) -> Trace:
    """Open-loop bursts: ``per_burst`` requests for one model within ``spread_s``, one every ``every_s``."""
    out = []
    order = ["llm", "sdxl", "llm", "sdxl", "tts", "sdxl", "llm", "tts"]
    work = {"llm": (2.0, 4.0), "sdxl": (6.0, 10.0), "tts": (1.5, 2.5)}
    for b in range(n_bursts):
        model = order[b % len(order)]
        start = every_s * b
        for _ in range(per_burst):
            out.append((Step(start + rng.uniform(0.0, spread_s), model, rng.uniform(*work[model])),))
    return Trace(
        "bursts",
        f"{n_bursts} bursts of {per_burst} requests within {spread_s:g} s, one every {every_s:g} s, "
        f"models in turn {'/'.join(order)}",
        tuple(out),
    )


def hot_model(rng: random.Random, clients: int, steps: int, sdxl_every_s: float, sdxl_count: int) -> Trace:
    """Closed-loop LLM clients that rarely pause together, plus a lone SDXL request now and then."""
    out = []
    for _ in range(clients):
        out.append(tuple(Step(rng.uniform(0.0, 0.5), "llm", rng.uniform(2.0, 4.0)) for _ in range(steps)))
    for i in range(sdxl_count):
        out.append((Step(sdxl_every_s * (i + 0.5), "sdxl", rng.uniform(6.0, 10.0)),))
    return Trace(
        "hot",
        f"{clients} LLM clients x {steps} requests back to back; one SDXL request every {sdxl_every_s:g} s "
        f"({sdxl_count} in all)",
        tuple(out),
    )


def make_traces(quick: bool, seed: int) -> list[Trace]:
    if quick:
        return [
            interleaved_agents(random.Random(seed), agents=16, loops=2),
            bursts(random.Random(seed + 1), n_bursts=10, per_burst=6),
            hot_model(random.Random(seed + 2), clients=8, steps=40, sdxl_every_s=40.0, sdxl_count=3),
        ]
    return [
        interleaved_agents(random.Random(seed), agents=16, loops=6),
        bursts(random.Random(seed + 1), n_bursts=30, per_burst=6),
        hot_model(random.Random(seed + 2), clients=8, steps=150, sdxl_every_s=60.0, sdxl_count=8),
    ]


# -- running -------------------------------------------------------------------------------------


def make_config(mode: str, time_scale: float) -> Config:
    """The embedded default config with the mode, the time scale and the scaled bounds."""
    text = resources.files("orchestrator").joinpath("defaults", DEFAULT_CONFIG_NAME).read_text()
    raw = yaml.safe_load(text)
    raw.setdefault("simulation", {})["time_scale"] = time_scale
    sw = raw.setdefault("switching", {})
    sw["scheduling"] = mode
    sw["fairness_s"] = FAIRNESS_S * time_scale
    sw["max_wait_s"] = MAX_WAIT_S * time_scale
    # Timeouts stay in real seconds and generous: a benchmark measures, it does not fail loads.
    return parse_config(yaml.safe_dump(raw), source=f"<benchmark: {DEFAULT_CONFIG_NAME}, {mode}>")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (the orchestrator's own definition)."""
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


@dataclass
class Result:
    trace: str
    mode: str
    switches: int = 0
    loads: int = 0
    restores: int = 0
    makespan_s: float = 0.0  # simulated
    switching_s: float = 0.0  # simulated, inside switches
    waits_s: list[float] = field(default_factory=list)  # simulated, every granted lease
    waits_by_kind: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    unfinished: int = 0  # requests not served when a stalled run was stopped
    stalled: bool = False
    peak_committed_bytes: int = 0
    budget_bytes: int = 0
    stats_waits: int = 0  # statistics().waits.count, to cross-check our own records

    def wait(self, q: float) -> float:
        return percentile(sorted(self.waits_s), q)

    def max_wait(self, kind: str | None = None) -> float | None:
        w = self.waits_s if kind is None else self.waits_by_kind.get(kind, [])
        return max(w) if w else None


async def run_trace(trace: Trace, mode: str, time_scale: float) -> Result:
    config = make_config(mode, time_scale)
    res = Result(trace.name, mode, budget_bytes=config.budget_bytes)
    served = 0
    limiters = {k: anyio.CapacityLimiter(n) for k, n in CONCURRENCY.items()}

    async with Orchestrator(config) as orch:

        async def agent(steps: tuple[Step, ...]) -> None:
            nonlocal served
            for step in steps:
                if step.think_s > 0:
                    await anyio.sleep(step.think_s * time_scale)
                try:
                    async with orch.acquire(step.model) as lease:
                        waited = lease.waited_s / time_scale
                        res.waits_s.append(waited)
                        res.waits_by_kind.setdefault(lease.kind, []).append(waited)
                        async with limiters[lease.kind]:
                            await lease.handle.run(f"{trace.name} step", work_s=step.work_s)
                    served += 1
                except OrchestratorError as exc:
                    res.errors.append(f"{step.model}: {type(exc).__name__}: {exc}")

        t0 = time.perf_counter()
        with anyio.move_on_after(STALL_LIMIT_S * time_scale) as scope:
            async with anyio.create_task_group() as tg:
                for steps in trace.agents:
                    tg.start_soon(agent, steps)
        res.makespan_s = (time.perf_counter() - t0) / time_scale
        res.stalled = scope.cancelled_caught
        res.unfinished = trace.requests - served - len(res.errors)
        stats = orch.statistics()
        res.switches, res.loads, res.restores = stats.switches, stats.loads, stats.restores
        res.switching_s = stats.switching_s / time_scale
        res.peak_committed_bytes = stats.peak_committed_bytes
        res.stats_waits = stats.waits.count
    return res


# -- printing ------------------------------------------------------------------------------------


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def print_table(trace: Trace, results: list[Result]) -> None:
    print(f"\n== {trace.name}: {trace.description}; {trace.requests} requests")
    header = (
        f"{'mode':<15}{'switches':>9}{'loads':>7}{'restores':>9}{'makespan':>10}{'switching':>10}"
        f"{'p50 wait':>10}{'p99 wait':>10}{'max wait':>10}" + "".join(f"{'max ' + k:>10}" for k in KINDS)
    )
    print(header)
    print("-" * len(header))
    for r in results:
        row = (
            f"{r.mode:<15}{r.switches:>9}{r.loads:>7}{r.restores:>9}{r.makespan_s:>10.1f}{r.switching_s:>10.1f}"
            f"{r.wait(0.50):>10.1f}{r.wait(0.99):>10.1f}{_f(r.max_wait()):>10}"
            + "".join(f"{_f(r.max_wait(k)):>10}" for k in KINDS)
        )
        print(row)
    for r in results:
        if r.stalled:
            print(
                f"  !! {r.mode}: STOPPED after {STALL_LIMIT_S:g} simulated s with {r.unfinished} requests "
                "unserved (deadlock or starvation)"
            )
        elif r.unfinished:
            print(f"  !! {r.mode}: {r.unfinished} requests neither served nor failed")
        if r.errors:
            print(f"  !! {r.mode}: {len(r.errors)} requests failed, first: {r.errors[0]}")
        if r.peak_committed_bytes > r.budget_bytes:
            print(
                f"  !! {r.mode}: committed VRAM peaked at {r.peak_committed_bytes} bytes, over the budget "
                f"{r.budget_bytes}"
            )
        if r.stats_waits != len(r.waits_s):
            print(
                f"  !! {r.mode}: statistics() counted {r.stats_waits} waits, the benchmark {len(r.waits_s)}"
            )


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "inf"


async def main_async(args: argparse.Namespace) -> int:
    traces = [t for t in make_traces(args.quick, args.seed) if not args.trace or t.name in args.trace]
    print(
        f"scheduling benchmark: {'quick' if args.quick else 'full'} run, time scale {args.time_scale:g} "
        f"(1 ms real = {0.001 / args.time_scale:g} simulated s), seed {args.seed}, "
        f"fairness_s {FAIRNESS_S:g}, max_wait_s {MAX_WAIT_S:g} (simulated)"
    )
    print(
        f"python {platform.python_version()}, anyio {version('anyio')}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs; GPU work at once per kind: {CONCURRENCY}"
    )
    print("times in simulated seconds; switching = time spent inside switches")
    all_results: dict[str, list[Result]] = {}
    t_start = time.perf_counter()
    for trace in traces:
        results = [await run_trace(trace, mode, args.time_scale) for mode in MODES]
        all_results[trace.name] = results
        print_table(trace, results)
        sys.stdout.flush()

    print("\nswitches, fcfs / fair (and fcfs / resident_first):")
    tot = dict.fromkeys(MODES, 0)
    for name, results in all_results.items():
        by = {r.mode: r for r in results}
        for m in MODES:
            tot[m] += by[m].switches
        print(
            f"  {name:<12} fcfs/fair {ratio(by['fcfs'].switches, by['fair'].switches):>6}   "
            f"fcfs/resident_first {ratio(by['fcfs'].switches, by['resident_first'].switches):>6}   "
            f"({by['fcfs'].switches} / {by['fair'].switches} / {by['resident_first'].switches})"
        )
    if len(all_results) > 1:
        print(
            f"  {'all':<12} fcfs/fair {ratio(tot['fcfs'], tot['fair']):>6}   "
            f"fcfs/resident_first {ratio(tot['fcfs'], tot['resident_first']):>6}   "
            f"({tot['fcfs']} / {tot['fair']} / {tot['resident_first']})"
        )
    print(f"\nwall time {time.perf_counter() - t_start:.1f} s")
    bad = any(r.stalled or r.errors or r.unfinished for rs in all_results.values() for r in rs)
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scheduling", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small traces (under ~20 s on 2 cores)")
    p.add_argument(
        "--time-scale",
        type=float,
        default=None,
        help="real seconds per simulated second (default 0.002 with --quick, 0.005 otherwise)",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the traces (default 1)")
    p.add_argument(
        "--trace",
        action="append",
        choices=("interleaved", "bursts", "hot"),
        help="run only this trace (repeatable)",
    )
    args = p.parse_args(argv)
    if args.time_scale is None:
        args.time_scale = 0.002 if args.quick else 0.005
    if args.time_scale <= 0:
        p.error("--time-scale must be positive")
    return anyio.run(main_async, args)


if __name__ == "__main__":
    sys.exit(main())
