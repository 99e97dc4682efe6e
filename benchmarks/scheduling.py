"""Scheduling benchmark: the real Orchestrator on the simulated GPU, in its three modes, on a
virtual clock.

Each trace is a fixed, seeded list of requests; every mode replays the same traces on a fresh
Orchestrator built from the embedded default config (the Model Management Module's 16 GiB card
and models, its scheduler settings untouched) at time scale 1, so simulated latencies are the
module's real seconds. Every run has its own event loop: anyio on trio with
``trio.testing.MockClock(autojump_threshold=0)``, the orchestrator's clock being the loop's
(``anyio.current_time``). Whenever every task waits, the clock jumps to the next deadline: no
real time is slept, and the figures are exact. Trio shuffles the order in which tasks woken
together run, from a private random generator; each run seeds it (with the trace's seed), so
the same seed gives the same figures, bit for bit, in any process.

Traces:

``interleaved``
    16 agents, each looping through the Model Management Module's Example 1 (LLM plans, SDXL
    draws, TTS speaks, LLM reviews), with a work time per step and small random think times.
``bursts``
    Open-loop bursts of requests for one model, then for another (LLM, SDXL, sometimes TTS):
    a burst every 40 s, its requests spread over 50 s, so each burst's tail overlaps the next.
``hot``
    Heavy, continuous LLM traffic (closed-loop clients that rarely all pause at once) and an
    occasional SDXL request. ``resident_first`` never switches while the LLM has a lease, so
    SDXL waits for the LLM traffic to end; ``fair`` bounds its wait.
``mixed``
    16 agents of three sorts: chat agents (LLM only), artists (a short LLM prompt, then
    several SDXL images) and Example-1 workflows (LLM prompt -> SDXL image -> TTS narration).
    Run at two switch costs: ``design`` (no host tier: an exchange unloads and reloads from
    disk, 12-22 s, the Model Management Module's figures) and ``fast`` (every model keeps a
    pinned host copy: after the first cold loads an exchange takes under 1 s).

The other traces run at the ``default`` costs: the embedded config as shipped (the LLM
reloads from disk, SDXL and TTS come back from the host tier).

Capacity: an LLM server batches 8 requests, an SDXL pipeline draws one image at a time, a TTS
model speaks one line at a time (``CAPACITY``). The config says so to the scheduler
(``max_concurrent``), and the work inside a lease is limited the same way (as a real
pipeline's lock does), so a lease granted past the capacity queues inside the lease. Each run
reports the most leases held at once per model: at most the capacity when the scheduler
honours ``max_concurrent``.

Figures per run: switches (exchanges of the GPU, counted from the events: a finished switch
that took a model off the GPU and loaded or restored another; the first loads onto an empty
GPU and the shutdown's unloads are not switches), makespan, and the waits from calling
``acquire()`` to the start of the work (its turn at the model's capacity included). The
tables give the mean over the seeds; p99 and max are each run's, averaged. ``--stays`` also
prints each run's stays on the GPU: for each model, when it was loaded or restored and for how
long it stayed (until it was evicted, or until the shutdown), which is where the switches went.

Run: ``python -m benchmarks.scheduling [--quick] [--seeds N] [--seed FIRST] [--trace NAME]
[--stays] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from importlib.metadata import version
from typing import Any

import anyio
import yaml

from orchestrator import Orchestrator, OrchestratorError, parse_config
from orchestrator.config import DEFAULT_CONFIG_NAME, Config
from orchestrator.events import Event
from orchestrator.footprints import FootprintStore
from orchestrator.runtime.stats import percentile  # nearest rank: the orchestrator's own

MODES = ("fair", "fcfs", "resident_first")
KINDS = ("llm", "sdxl", "tts")
TRACES = ("interleaved", "bursts", "hot", "mixed")
COSTS = ("default", "design", "fast")
# Which switch costs each trace runs at.
TRACE_COSTS = {
    "interleaved": ("default",),
    "bursts": ("default",),
    "hot": ("default",),
    "mixed": ("design", "fast"),
}

# A run that has not finished after this many (virtual) seconds is stopped and reported.
STALL_LIMIT_S = 20_000.0
# Requests served at once per kind: an LLM server batches requests, an SDXL pipeline draws one
# image at a time, a TTS model speaks one line at a time.
CAPACITY = {"llm": 8, "sdxl": 1, "tts": 1}
# The host tier for the fast switches: room for a pinned copy of every model (GiB).
FAST_HOST_BUDGET_GB = 32.0


# -- traces --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """Sleep ``think_s``, then acquire ``model`` and use it for ``work_s`` (seconds)."""

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
    """Example 1 of the Model Management Module, looped by several agents at once."""
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


def mixed(rng: random.Random, chat: int, artists: int, workflows: int, rounds: int) -> Trace:
    """Chat agents, artists and Example-1 workflows at once, each for ``rounds`` rounds."""
    out: list[tuple[Step, ...]] = []
    for _ in range(chat):  # a conversation: short LLM turns, the user reading in between
        out.append(
            tuple(
                Step(rng.uniform(0.0, 3.0) if i == 0 else rng.uniform(2.0, 8.0), "llm", rng.uniform(1.5, 4.0))
                for i in range(3 * rounds)
            )
        )
    for _ in range(artists):  # a prompt, then a few images of it
        steps: list[Step] = []
        for i in range(rounds):
            steps.append(
                Step(rng.uniform(0.0, 3.0) if i == 0 else rng.uniform(2.0, 6.0), "llm", rng.uniform(1.0, 2.0))
            )
            steps += [
                Step(rng.uniform(0.0, 1.0), "sdxl", rng.uniform(6.0, 10.0)) for _ in range(rng.randint(2, 3))
            ]
        out.append(tuple(steps))
    for _ in range(workflows):  # Example 1: LLM prompt -> SDXL image -> TTS narration
        steps = []
        for i in range(rounds):
            steps += [
                Step(
                    rng.uniform(0.0, 3.0) if i == 0 else rng.uniform(2.0, 6.0), "llm", rng.uniform(2.0, 4.0)
                ),
                Step(rng.uniform(0.0, 1.0), "sdxl", rng.uniform(6.0, 10.0)),
                Step(rng.uniform(0.0, 1.0), "tts", rng.uniform(1.5, 2.5)),
            ]
        out.append(tuple(steps))
    return Trace(
        "mixed",
        f"{chat} chat agents (3 LLM turns a round), {artists} artists (LLM prompt, 2-3 SDXL images), "
        f"{workflows} Example-1 workflows (LLM -> SDXL -> TTS); {rounds} rounds each",
        tuple(out),
    )


def make_trace(name: str, quick: bool, seed: int) -> Trace:
    """The trace ``name`` for one seed (each trace draws from its own generator)."""
    if name == "interleaved":
        return interleaved_agents(random.Random(seed), agents=16, loops=2 if quick else 6)
    if name == "bursts":
        return bursts(random.Random(seed + 1), n_bursts=10 if quick else 30, per_burst=6)
    if name == "hot":
        if quick:
            return hot_model(random.Random(seed + 2), clients=8, steps=40, sdxl_every_s=40.0, sdxl_count=3)
        return hot_model(random.Random(seed + 2), clients=8, steps=150, sdxl_every_s=60.0, sdxl_count=8)
    if name == "mixed":
        return mixed(random.Random(seed + 3), chat=6, artists=4, workflows=6, rounds=2 if quick else 5)
    raise ValueError(f"unknown trace {name!r}; choose one of {', '.join(TRACES)}")


# -- configs -------------------------------------------------------------------------------------


def make_config(mode: str, costs: str) -> Config:
    """The embedded default config at time scale 1, in ``mode``, at the switch ``costs``:

    ``default``: as shipped; ``design``: no host tier (every exchange unloads and loads from
    disk); ``fast``: a pinned host copy of every model (exchanges are offloads and restores).
    Every model's ``max_concurrent`` is its kind's ``CAPACITY``. The scheduler's own settings
    (``fairness``, ``fairness_s``, ``max_wait_s``) are the default config's.
    """
    if costs not in COSTS:
        raise ValueError(f"unknown switch costs {costs!r}; choose one of {', '.join(COSTS)}")
    text = resources.files("orchestrator").joinpath("defaults", DEFAULT_CONFIG_NAME).read_text()
    raw = yaml.safe_load(text)
    raw.setdefault("simulation", {})["time_scale"] = 1.0
    sw = raw.setdefault("switching", {})
    sw["scheduling"] = mode
    # A benchmark measures, it does not fail loads: generous (virtual) timeouts.
    sw["load_timeout_s"] = max(float(sw.get("load_timeout_s", 0.0)), 600.0)
    for m in raw["models"].values():
        m["max_concurrent"] = CAPACITY[m["kind"]]
        if costs == "design":
            m["offload"] = False
            m.pop("host_gb", None)
        elif costs == "fast":
            m["offload"] = True
            m.setdefault("host_gb", m["vram_gb"])
    if costs == "fast":
        sw["host_ram_budget_gb"] = FAST_HOST_BUDGET_GB
    raw.setdefault("monitor", {})["footprints_path"] = None  # learned sizes stay in the run
    return parse_config(
        yaml.safe_dump(raw), source=f"<benchmark: {DEFAULT_CONFIG_NAME}, {mode}, {costs} costs>"
    )


# -- one run -------------------------------------------------------------------------------------


@dataclass
class Result:
    """One run: a trace, a mode, switch costs, a seed. Times in (virtual) seconds."""

    trace: str
    costs: str
    mode: str
    seed: int
    requests: int
    switches: int = 0  # exchanges of the GPU, from the events
    loads: int = 0  # from disk, first loads included
    restores: int = 0  # from the host tier
    stats_switches: int = 0  # statistics().switches, for comparison
    makespan_s: float = 0.0
    switching_s: float = 0.0  # inside switches (statistics().switching_s)
    waits_s: list[float] = field(default_factory=list)  # acquire() to the start of the work (sorted)
    lease_waits_s: list[float] = field(default_factory=list)  # lease.waited_s, the same requests
    waits_by_kind: dict[str, list[float]] = field(default_factory=dict)
    max_leases: dict[str, int] = field(default_factory=dict)  # most leases held at once, per kind
    # each stay of a model on the GPU: (model, loaded at, seconds until evicted or the shutdown)
    stays: list[tuple[str, float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unfinished: int = 0  # requests not served when a stalled run was stopped
    stalled: bool = False
    peak_committed_bytes: int = 0
    budget_bytes: int = 0
    stats_waits: int = 0  # statistics().waits.count, to cross-check our own records
    real_s: float = 0.0  # wall time of the run (not part of the figures)

    def wait(self, q: float) -> float:
        return percentile(sorted(self.waits_s), q)

    @property
    def mean_wait_s(self) -> float:
        return statistics.fmean(self.waits_s) if self.waits_s else 0.0

    @property
    def max_wait_s(self) -> float:
        return max(self.waits_s, default=0.0)

    @property
    def inner_queue_s(self) -> float:
        """Mean of (measured wait - lease.waited_s): the queue inside granted leases."""
        if not self.waits_s:
            return 0.0
        return statistics.fmean(w - lw for w, lw in zip(self.waits_s, self.lease_waits_s, strict=True))

    def figures(self) -> dict[str, float]:
        return {
            "switches": float(self.switches),
            "makespan_s": self.makespan_s,
            "mean_wait_s": self.mean_wait_s,
            "p99_wait_s": self.wait(0.99),
            "max_wait_s": self.max_wait_s,
        }


class SwitchCounter:
    """Counts exchanges of the GPU from the orchestrator's events, and the leases held at once.

    A switch (``begin_switch`` to ``finish_switch``) is an exchange when it took a model off
    the GPU (not at shutdown) and loaded or restored one. Grants and releases give the leases
    held per model at each moment; loads and evictions, each model's stays on the GPU.
    """

    def __init__(self, kind_of: dict[str, str]) -> None:
        self.kind_of = kind_of
        self.switches = self.loads = self.restores = 0
        self._in_switch = False
        self._evicted = self._loaded = False
        self.held: dict[str, int] = {}
        self.max_held: dict[str, int] = {}
        self.stays: list[tuple[str, float, float]] = []
        self._on_gpu_since: dict[str, float] = {}

    def __call__(self, e: Event) -> None:
        if e.kind == "transition":
            if e.trigger == "begin_switch":
                self._in_switch, self._evicted, self._loaded = True, False, False
            elif e.trigger in ("finish_switch", "fail_switch"):
                if e.trigger == "finish_switch" and self._in_switch and self._evicted and self._loaded:
                    self.switches += 1
                self._in_switch = False
        elif e.kind == "evict":
            detail = e.detail or ""
            if detail.startswith("gpu ->"):  # (a host copy dropped is not a stay's end)
                if "(shutdown)" not in detail:
                    self._evicted = True
                since = self._on_gpu_since.pop(e.model, None) if e.model is not None else None
                if since is not None:
                    self.stays.append((e.model, since, e.time_s - since))
        elif e.kind == "load":
            self._loaded = True
            if e.model is not None:
                self._on_gpu_since[e.model] = e.time_s
            if (e.detail or "") == "from host":
                self.restores += 1
            else:
                self.loads += 1
        elif e.kind == "grant" and e.model is not None:
            self.held[e.model] = n = self.held.get(e.model, 0) + 1
            kind = self.kind_of[e.model]
            self.max_held[kind] = max(self.max_held.get(kind, 0), n)
        elif e.kind == "release" and e.model is not None:
            self.held[e.model] -= 1


async def _run(trace: Trace, mode: str, costs: str, seed: int) -> Result:
    config = make_config(mode, costs)
    res = Result(trace.name, costs, mode, seed, trace.requests, budget_bytes=config.budget_bytes)
    served = 0
    limiters = {k: anyio.CapacityLimiter(n) for k, n in CAPACITY.items()}
    counter = SwitchCounter({name: spec.kind for name, spec in config.models.items()})
    now = anyio.current_time

    async with Orchestrator(config, clock=now, footprints=FootprintStore(None)) as orch:
        remove = orch.hub.add_listener(counter)

        async def agent(steps: tuple[Step, ...]) -> None:
            nonlocal served
            for step in steps:
                if step.think_s > 0:
                    await anyio.sleep(step.think_s)
                asked = now()
                try:
                    async with orch.acquire(step.model) as lease:
                        async with limiters[lease.kind]:  # the model's capacity, inside the lease
                            waited = now() - asked
                            res.waits_s.append(waited)
                            res.lease_waits_s.append(lease.waited_s)
                            res.waits_by_kind.setdefault(lease.kind, []).append(waited)
                            await lease.handle.run(f"{trace.name} step", work_s=step.work_s)
                    served += 1
                except OrchestratorError as exc:
                    res.errors.append(f"{step.model}: {type(exc).__name__}: {exc}")

        t0 = now()
        with anyio.move_on_after(STALL_LIMIT_S) as scope:
            async with anyio.create_task_group() as tg:
                for steps in trace.agents:
                    tg.start_soon(agent, steps)
        res.makespan_s = now() - t0
        res.stalled = scope.cancelled_caught
        res.unfinished = trace.requests - served - len(res.errors)
        stats = orch.statistics()
    remove()  # (after the shutdown, whose unloads end the last stays)
    res.switches, res.loads, res.restores = counter.switches, counter.loads, counter.restores
    res.max_leases = dict(counter.max_held)
    res.stays = sorted(counter.stays, key=lambda stay: stay[1])
    # Leases granted in the same instant start their work in an order that no figure depends on
    # and that differs from process to process (the grant wakes them together): keep the waits
    # sorted, so that one seed gives one JSON.
    pairs = sorted(zip(res.waits_s, res.lease_waits_s, strict=True))
    res.waits_s = [w for w, _ in pairs]
    res.lease_waits_s = [lw for _, lw in pairs]
    res.waits_by_kind = {k: sorted(v) for k, v in sorted(res.waits_by_kind.items())}
    res.stats_switches = stats.switches
    res.switching_s = stats.switching_s
    res.peak_committed_bytes = stats.peak_committed_bytes
    res.stats_waits = stats.waits.count
    return res


def _seed_trio_scheduler(seed: int) -> None:
    """Trio runs the tasks woken together in a random order (to shake out ordering bugs),
    drawn from a generator of its own, ``trio._core._run._r`` (the one Hypothesis seeds for
    trio's tests). Seed it, or the same trace gives different figures from run to run."""
    from trio._core import _run

    rng = getattr(_run, "_r", None)
    if not isinstance(rng, random.Random):
        raise RuntimeError(
            f"trio {version('trio')} has no scheduler generator trio._core._run._r to seed: the "
            "benchmark's figures would not be repeatable; install a trio this benchmark knows (0.25-0.35)"
        )
    rng.seed(seed)


def run_one(trace: Trace, mode: str, costs: str, seed: int) -> Result:
    """One run on its own event loop and virtual clock (trio's MockClock, starting at 0)."""
    try:
        import trio.testing
    except ImportError:
        raise SystemExit(
            "the scheduling benchmark runs on trio's virtual clock: pip install trio "
            "(it is in the dev extra: pip install -e '.[dev]')"
        ) from None
    _seed_trio_scheduler(seed)
    clock = trio.testing.MockClock(autojump_threshold=0)
    t0 = time.perf_counter()
    res = anyio.run(
        functools.partial(_run, trace, mode, costs, seed), backend="trio", backend_options={"clock": clock}
    )
    res.real_s = time.perf_counter() - t0
    return res


# -- summaries -----------------------------------------------------------------------------------


FIGURES = ("switches", "makespan_s", "mean_wait_s", "p99_wait_s", "max_wait_s")


def mean_figures(results: Sequence[Result]) -> dict[str, float]:
    """The mean over the runs (seeds) of each figure."""
    return {k: statistics.fmean(r.figures()[k] for r in results) for k in FIGURES}


def ratio(a: float, b: float) -> float | None:
    if b == 0:
        return None if a else 1.0
    return a / b


def summarize(results: Sequence[Result]) -> list[dict[str, Any]]:
    """Per (trace, costs): each mode's mean figures, and fair's ratios to the other modes."""
    groups: dict[tuple[str, str], dict[str, list[Result]]] = {}
    for r in results:
        groups.setdefault((r.trace, r.costs), {}).setdefault(r.mode, []).append(r)
    out = []
    for (trace, costs), by_mode in groups.items():
        means = {m: mean_figures(rs) for m, rs in by_mode.items()}
        entry: dict[str, Any] = {
            "trace": trace,
            "costs": costs,
            "seeds": sorted({r.seed for rs in by_mode.values() for r in rs}),
            "modes": {
                m: {
                    **means[m],
                    "stats_switches": statistics.fmean(r.stats_switches for r in rs),
                    "inner_queue_s": statistics.fmean(r.inner_queue_s for r in rs),
                    "max_leases": {k: max(r.max_leases.get(k, 0) for r in rs) for k in KINDS},
                }
                for m, rs in by_mode.items()
            },
            "ratios": {},
        }
        if "fair" in means:
            for other in ("resident_first", "fcfs"):
                if other in means:
                    entry["ratios"][f"fair/{other}"] = {
                        k: ratio(means["fair"][k], means[other][k]) for k in FIGURES
                    }
        out.append(entry)
    return out


# -- printing ------------------------------------------------------------------------------------


def _r(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def print_group(entry: dict[str, Any], description: str, requests: int) -> None:
    seeds = entry["seeds"]
    print(
        f"\n== {entry['trace']} at {entry['costs']} switch costs: {description}; {requests} requests "
        f"(seed {seeds[0]}); the mean over seeds {', '.join(map(str, seeds))}"
    )
    header = (
        f"{'mode':<15}{'switches':>9}{'makespan':>10}{'mean wait':>10}{'p99 wait':>10}{'max wait':>10}"
        f"{'stats sw':>9}{'in-lease q':>11}{'  max leases llm/sdxl/tts':>26}"
    )
    print(header)
    print("-" * len(header))
    for mode, f in entry["modes"].items():
        ml = f["max_leases"]
        leases = "/".join(str(ml[k]) for k in KINDS)
        print(
            f"{mode:<15}{f['switches']:>9.1f}{f['makespan_s']:>10.1f}{f['mean_wait_s']:>10.1f}"
            f"{f['p99_wait_s']:>10.1f}{f['max_wait_s']:>10.1f}{f['stats_switches']:>9.1f}"
            f"{f['inner_queue_s']:>11.1f}{leases:>26}"
        )
    for name, rs in entry["ratios"].items():
        print(
            f"  {name:<20}"
            + "  ".join(f"{k.removesuffix('_s').replace('_', ' ')} {_r(rs[k])}" for k in FIGURES)
        )


def print_stays(results: Sequence[Result]) -> None:
    """Each run's stays on the GPU, per model: ``loaded at+seconds there``."""
    for r in results:
        print(f"  stays on the GPU, {r.mode}, seed {r.seed} ({r.switches} switches):")
        for model in sorted({m for m, _, _ in r.stays}):
            stays = [f"{at:.0f}+{s:.0f}" for m, at, s in r.stays if m == model]
            print(f"    {model:<18} {len(stays):>3}: {' '.join(stays)}")


def print_problems(results: Sequence[Result]) -> None:
    for r in results:
        who = f"{r.trace}/{r.costs}/{r.mode}/seed {r.seed}"
        if r.stalled:
            print(f"  !! {who}: STOPPED after {STALL_LIMIT_S:g} s with {r.unfinished} requests unserved")
        elif r.unfinished:
            print(f"  !! {who}: {r.unfinished} requests neither served nor failed")
        if r.errors:
            print(f"  !! {who}: {len(r.errors)} requests failed, first: {r.errors[0]}")
        if r.peak_committed_bytes > r.budget_bytes:
            print(
                f"  !! {who}: committed VRAM peaked at {r.peak_committed_bytes} bytes, over {r.budget_bytes}"
            )
        if r.stats_waits != len(r.waits_s):
            print(f"  !! {who}: statistics() counted {r.stats_waits} waits, the benchmark {len(r.waits_s)}")


def run_group(
    name: str, costs: str, seeds: Sequence[int], quick: bool, modes: Sequence[str] = MODES
) -> list[Result]:
    """Every (mode, seed) run of one trace at one switch-cost setting."""
    out = []
    for seed in seeds:
        trace = make_trace(name, quick, seed)
        out += [run_one(trace, mode, costs, seed) for mode in modes]
    return out


def _run_json(r: Result) -> dict[str, Any]:
    """One run's figures. The per-request waits are sorted: requests that end at the same
    virtual instant may be recorded in either order (the figures are the same)."""
    out = {k: v for k, v in asdict(r).items() if k != "real_s"}
    for key in ("waits_s", "lease_waits_s"):
        out[key] = sorted(out[key])
    out["waits_by_kind"] = {k: sorted(v) for k, v in out["waits_by_kind"].items()}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scheduling", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small traces and 2 seeds (CI)")
    p.add_argument(
        "--seeds", type=int, default=None, help="how many seeds to average (default 5; 2 with --quick)"
    )
    p.add_argument("--seed", type=int, default=1, help="the first seed (default 1)")
    p.add_argument("--trace", action="append", choices=TRACES, help="run only this trace (repeatable)")
    p.add_argument(
        "--stays", action="store_true", help="also print each run's stays on the GPU (when, how long)"
    )
    p.add_argument("--json", metavar="PATH", help="also write every run's figures and the summary as JSON")
    args = p.parse_args(argv)
    n_seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    if n_seeds < 1:
        p.error("--seeds must be at least 1")
    seeds = list(range(args.seed, args.seed + n_seeds))
    traces = [t for t in TRACES if not args.trace or t in args.trace]

    sw = make_config("fair", "default")
    print(
        f"scheduling benchmark: {'quick' if args.quick else 'full'} run on a virtual clock (trio MockClock), "
        f"time scale 1, seeds {seeds[0]}-{seeds[-1]}; the default config: fairness {sw.fairness}"
        + (f" (fairness_s {sw.fairness_s:g})" if sw.fairness == "time" else "")
        + f", max_wait_s {sw.max_wait_s:g}"
    )
    print(
        f"python {platform.python_version()}, anyio {version('anyio')}, trio {version('trio')}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs; capacity (max_concurrent) per kind: {CAPACITY}"
    )
    print(
        "times in seconds; waits from acquire() to the start of the work; p99 and max are per run, "
        "averaged; stats sw = statistics().switches; in-lease q = mean wait inside a granted lease "
        "for the model's capacity; max leases = most leases held at once on one model"
    )
    t_start = time.perf_counter()
    results: list[Result] = []
    for name in traces:
        first = make_trace(name, args.quick, seeds[0])
        for costs in TRACE_COSTS[name]:
            group = run_group(name, costs, seeds, args.quick)
            (entry,) = summarize(group)
            print_group(entry, first.description, first.requests)
            if args.stays:
                print_stays(group)
            sys.stdout.flush()
            results += group
    summary = summarize(results)
    print_problems(results)
    real_s = time.perf_counter() - t_start
    print(f"\n{len(results)} runs, wall time {real_s:.1f} s")
    if args.json:
        doc = {
            "quick": args.quick,
            "seeds": seeds,
            "capacity": CAPACITY,
            "runs": [_run_json(r) for r in results],
            "summary": summary,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
    bad = any(r.stalled or r.errors or r.unfinished for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
