"""Several cards: the scheduling benchmark's mixed trace on one card, on two cards with
placement, and on two cards split by hand, on a virtual clock.

The machines:

``one card``
    a 24 GiB card (23.5 GiB budget): every model on it, one heavy model at a time.
``two cards``
    a 24 GiB and a 16 GiB card (23.5 and 15.5 GiB budgets): the orchestrator places each
    request (``states.placement``).
``static split``
    the same two cards with each model pinned to one card by hand (``gpus:``), the way users
    configure llama-swap today: the LLMs on the 24 GiB card, the SDXL pipelines and the TTS
    model on the 16 GiB one.

The trace is ``benchmarks.scheduling``'s mixed trace (chat agents, artists, Example-1
workflows) with several models of each kind: chat agents and artists use one of two LLMs
(qwen-14b, qwen-coder-7b) and one of two SDXL pipelines (sdxl-base, sdxl-lora) each; the
workflows use qwen-14b, sdxl-base and the TTS model. The switch costs are the scheduling
benchmark's ``design`` ones (no host tier: an exchange unloads and reloads from disk) and
``fast`` ones (a pinned host copy of every model, shared by the cards).

Figures: switches (exchanges, per card: a finished switch on a card that took a model off it
and loaded another), makespan, p99 and max wait. The ideal makespan on two cards is the larger
of half the one-card makespan (the work spread evenly) and the trace's critical path (the
longest agent's think and work times, with no wait at all). Below it, a makespan no machine can
beat: the larger of the critical path and the work of the busiest model that serves one request
at a time (sdxl-base: a model is on one card, so its images are drawn one after another there).

Run: ``python -m benchmarks.multigpu [--quick] [--seeds N]``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import anyio
import yaml

from benchmarks.scheduling import (
    CAPACITY,
    FAST_HOST_BUDGET_GB,
    Step,
    Trace,
    _seed_trio_scheduler,
    mixed,
)
from orchestrator import Orchestrator, OrchestratorError, parse_config
from orchestrator.config import DEFAULT_CONFIG_NAME, Config
from orchestrator.events import Event
from orchestrator.footprints import FootprintStore
from orchestrator.runtime.stats import percentile

LLMS = ("qwen-14b", "qwen-coder-7b")
SDXLS = ("sdxl-base", "sdxl-lora")
MACHINES = ("one card", "two cards", "static split")
CARDS = {
    "one card": [(0, 24.0, 23.5)],
    "two cards": [(0, 24.0, 23.5), (1, 16.0, 15.5)],
    "static split": [(0, 24.0, 23.5), (1, 16.0, 15.5)],
}
STATIC = {"llm": [0], "sdxl": [1], "tts": [1]}  # the hand-made split, by kind
KIND = {**dict.fromkeys(LLMS, "llm"), **dict.fromkeys(SDXLS, "sdxl"), "tts": "tts"}
STALL_LIMIT_S = 20_000.0


def trace_for(seed: int, quick: bool) -> Trace:
    """The mixed trace with two models of each heavy kind (see the module docstring)."""
    import random

    base = mixed(random.Random(seed + 3), chat=6, artists=4, workflows=6, rounds=2 if quick else 5)
    agents: list[tuple[Step, ...]] = []
    for i, steps in enumerate(base.agents):
        workflow = any(s.model == "tts" for s in steps)
        names = {"llm": "qwen-14b", "sdxl": "sdxl-base", "tts": "tts"}
        if not workflow:
            names = {"llm": LLMS[i % 2], "sdxl": SDXLS[(i // 2) % 2], "tts": "tts"}
        agents.append(tuple(replace(s, model=names[s.model]) for s in steps))
    return Trace(
        "mixed, several models", base.description + "; two LLMs and two SDXL pipelines", tuple(agents)
    )


def critical_path_s(trace: Trace) -> float:
    return max(sum(s.think_s + s.work_s for s in steps) for steps in trace.agents)


def serial_work_s(trace: Trace) -> tuple[str, float]:
    """The busiest model that serves one request at a time (``max_concurrent: 1``), and its
    work in all: a model is on one card, so no machine finishes before it has done that work
    one request after another."""
    work: dict[str, float] = {}
    for steps in trace.agents:
        for s in steps:
            if CAPACITY[KIND[s.model]] == 1:
                work[s.model] = work.get(s.model, 0.0) + s.work_s
    model = max(work, key=work.__getitem__)
    return model, work[model]


def make_config(machine: str, costs: str) -> Config:
    raw = yaml.safe_load(
        resources.files("orchestrator").joinpath("defaults", DEFAULT_CONFIG_NAME).read_text()
    )
    hw = raw["hardware"]
    for k in ("total_vram_gb", "safe_max_vram_gb"):
        hw.pop(k, None)
    hw["gpus"] = [
        {"index": i, "total_vram_gb": total, "safe_max_vram_gb": budget}
        for i, total, budget in CARDS[machine]
    ]
    raw.setdefault("simulation", {})["time_scale"] = 1.0
    sw = raw.setdefault("switching", {})
    sw["load_timeout_s"] = 600.0
    models = raw["models"]
    keep = {*LLMS, *SDXLS, "gpt-sovits-small"}
    raw["models"] = {n: m for n, m in models.items() if n in keep}
    raw["models"]["gpt-sovits-small"].setdefault("aliases", []).append("tts")
    for m in raw["models"].values():
        m["max_concurrent"] = CAPACITY[m["kind"]]
        if machine == "static split":
            m["gpus"] = STATIC[m["kind"]]
        if costs == "design":
            m["offload"] = False
            m.pop("host_gb", None)
        else:
            m["offload"] = True
            m.setdefault("host_gb", m["vram_gb"])
    sw["host_ram_budget_gb"] = FAST_HOST_BUDGET_GB if costs == "fast" else 0
    raw.pop("defaults", None)
    raw.setdefault("monitor", {})["footprints_path"] = None
    return parse_config(yaml.safe_dump(raw), source=f"<benchmark: {machine}, {costs} costs>")


class CardSwitches:
    """Exchanges per card, from the events (as ``benchmarks.scheduling.SwitchCounter``, for
    each card on its own: switches on different cards overlap)."""

    def __init__(self) -> None:
        self.by_card: dict[int, int] = {}
        self._open: dict[int, list[bool]] = {}  # card -> [evicted, loaded]

    def __call__(self, e: Event) -> None:
        gpu = 0 if e.gpu is None else e.gpu
        if e.kind == "transition" and e.trigger == "begin_switch":
            self._open[gpu] = [False, False]
        elif e.kind == "transition" and e.trigger in ("finish_switch", "fail_switch"):
            state = self._open.pop(gpu, None)
            if e.trigger == "finish_switch" and state is not None and all(state):
                self.by_card[gpu] = self.by_card.get(gpu, 0) + 1
        elif (
            e.kind == "evict"
            and (e.detail or "").startswith("gpu ->")
            and "(shutdown)" not in (e.detail or "")
        ):
            if gpu in self._open:
                self._open[gpu][0] = True
        elif e.kind == "load" and gpu in self._open:
            self._open[gpu][1] = True


@dataclass
class Run:
    machine: str
    costs: str
    seed: int
    switches: dict[int, int] = field(default_factory=dict)
    makespan_s: float = 0.0
    waits_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    over_budget: list[str] = field(default_factory=list)

    @property
    def total_switches(self) -> int:
        return sum(self.switches.values())


async def _run(trace: Trace, machine: str, costs: str, seed: int) -> Run:
    config = make_config(machine, costs)
    res = Run(machine, costs, seed)
    counter = CardSwitches()
    now = anyio.current_time

    def budget(e: Event) -> None:
        if (
            e.committed_bytes is not None
            and e.budget_bytes is not None
            and e.committed_bytes > e.budget_bytes
        ):
            res.over_budget.append(f"{e.kind} {e.model} on card {e.gpu}")

    async with Orchestrator(config, clock=now, footprints=FootprintStore(None)) as orch:
        orch.hub.add_listener(counter)
        orch.hub.add_listener(budget)

        async def agent(steps: tuple[Step, ...]) -> None:
            for step in steps:
                if step.think_s > 0:
                    await anyio.sleep(step.think_s)
                asked = now()
                try:
                    async with orch.acquire(step.model) as lease:
                        res.waits_s.append(now() - asked)
                        await lease.handle.run("step", work_s=step.work_s)
                except OrchestratorError as exc:
                    res.errors.append(f"{step.model}: {exc}")

        t0 = now()
        with anyio.move_on_after(STALL_LIMIT_S):
            async with anyio.create_task_group() as tg:
                for steps in trace.agents:
                    tg.start_soon(agent, steps)
        res.makespan_s = now() - t0
    res.switches = dict(counter.by_card)
    return res


def run_one(trace: Trace, machine: str, costs: str, seed: int) -> Run:
    import trio.testing

    _seed_trio_scheduler(seed)
    clock = trio.testing.MockClock(autojump_threshold=0)
    return anyio.run(
        functools.partial(_run, trace, machine, costs, seed), backend="trio", backend_options={"clock": clock}
    )


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else 0.0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.multigpu", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short traces and 2 seeds")
    p.add_argument("--seeds", type=int, default=None, help="seeds to average (default 5; 2 with --quick)")
    args = p.parse_args(argv)
    seeds = list(range(1, 1 + (args.seeds or (2 if args.quick else 5))))
    t_start = time.perf_counter()
    print(
        f"several cards: the mixed trace with two LLMs and two SDXL pipelines, seeds {seeds[0]}-{seeds[-1]}"
    )
    print("times in seconds (virtual); switches per card; the ideal = max(one card / 2, critical path)")
    bad = False
    for costs in ("design", "fast"):
        runs: dict[str, list[Run]] = {m: [] for m in MACHINES}
        paths: list[float] = []
        serial: list[float] = []
        for seed in seeds:
            trace = trace_for(seed, args.quick)
            paths.append(critical_path_s(trace))
            busiest, work_s = serial_work_s(trace)
            serial.append(work_s)
            for machine in MACHINES:
                runs[machine].append(run_one(trace, machine, costs, seed))
        print(f"\n{costs} switch costs ({trace.requests} requests a seed)")
        print(
            f"  {'machine':<14} {'switches':>9} {'per card':>16} "
            f"{'makespan':>9} {'p99 wait':>9} {'max wait':>9}"
        )
        figures: dict[str, dict[str, Any]] = {}
        for machine in MACHINES:
            rs = runs[machine]
            per_card = {
                g: _mean([r.switches.get(g, 0) for r in rs])
                for g in sorted({g for r in rs for g in r.switches} | {0})
            }
            fig = {
                "switches": _mean([r.total_switches for r in rs]),
                "per_card": per_card,
                "makespan_s": _mean([r.makespan_s for r in rs]),
                "p99_s": _mean([percentile(sorted(r.waits_s), 0.99) for r in rs]),
                "max_s": _mean([max(r.waits_s, default=0.0) for r in rs]),
            }
            figures[machine] = fig
            cards = " ".join(f"{g}:{n:.1f}" for g, n in per_card.items())
            print(
                f"  {machine:<14} {fig['switches']:>9.1f} {cards:>16} {fig['makespan_s']:>9.1f} "
                f"{fig['p99_s']:>9.1f} {fig['max_s']:>9.1f}"
            )
            for r in rs:
                if r.errors or r.over_budget:
                    bad = True
                    print(
                        f"    seed {r.seed}: {len(r.errors)} errors {r.errors[:2]}; "
                        f"over budget {r.over_budget[:2]}"
                    )
        ideal = max(figures["one card"]["makespan_s"] / 2, _mean(paths))
        bound = max(_mean(paths), _mean(serial))
        worst_static = max(figures["static split"]["per_card"].values())
        two = figures["two cards"]
        fewer = worst_static / two["switches"] if two["switches"] else float("inf")
        print(
            f"  two cards: {two['switches']:.1f} switches against the static split's worst card "
            f"{worst_static:.1f} ({fewer:.2f}x fewer; "
            f"goal 3x); makespan {two['makespan_s']:.1f} s against the ideal {ideal:.1f} s "
            f"({two['makespan_s'] / ideal:.2f}x; goal within 1.10x)"
        )
        print(
            f"  a makespan no machine can beat: {bound:.1f} s (the larger of the critical path and "
            f"{busiest}'s work, one request at a time); two cards {two['makespan_s'] / bound:.2f}x it"
        )
    print(f"\nwall time {time.perf_counter() - t_start:.1f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
