"""Cluster benchmark: the mixed trace on 1, 2 and 4 simulated machines of a local Ray
cluster, and the router's added latency per acquire against a local ``acquire()``.

The machines are the nodes of a local multi-node Ray cluster (``ray.cluster_utils.Cluster``:
one raylet per node, each with one fake GPU and its ``vram-machine:<name>`` resource); each
runs an ``OrchestratorActor`` on the simulated device with the scheduling benchmark's mixed-
trace config (``benchmarks.scheduling.make_config``'s ``design`` costs: no host tier, every
exchange a reload from disk; ``max_concurrent`` per kind: LLM 8, SDXL 1, TTS 1), at
``--time-scale`` (simulated latencies and the trace's work times multiplied by it: real time,
not a virtual clock, since the machines are processes of their own).

**Scaling** (weak): on ``n`` machines the trace is ``n`` copies of the mixed trace (16 agents
each, seeds ``seed .. seed+n-1``), all through one ``ClusterOrchestrator``. Linear scaling is
``n`` times the requests per second of one machine; the figure is throughput(n) / (n x
throughput(1)). A local ``Orchestrator`` (in this process, the same config) runs the one-
machine trace too, as the reference without Ray. Figures: throughput (requests/s), switches
(every machine's ``statistics().switches``, summed), the waits from ``acquire()`` to the
grant (p50, p99, in seconds of the trace: real seconds / time scale).

**Routing overhead**: on a warm cluster (the LLM resident on a machine, nothing else
running), ``--acquires`` sequential ``acquire()`` of the resident LLM through the cluster, and
as many through a local ``Orchestrator`` in this process: the latency to enter the block and
the whole acquire + release cycle (until the block's ``async with`` has returned), each the
median and p99; and the routing decision alone (``states.routing.route`` over the four
machines' views), per call; and one Ray round trip to a machine's actor (``ping``), the
floor of any acquire that crosses a process. Back to back, each acquire carries the release
of the block before it (the machine does it first: one call per acquire); so the entry (and
the ping) is measured again with ``--pause-ms`` between blocks, where each release goes out
in a call of its own, answered during the pause (``*_paused_*``).

Run: ``python -m benchmarks.cluster [--quick] [--machines 1,2,4] [--time-scale S]
[--acquires N] [--pause-ms MS] [--overhead-only] [--repeat R] [--json PATH]`` (``--repeat``:
the overhead measured R times, each figure the median, the spread printed). Exits 1 if a
request failed or was lost, or a machine's committed bytes went over its budget.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.metadata import version
from typing import Any

import anyio
import yaml

from benchmarks.scheduling import CAPACITY, Trace, make_trace
from orchestrator import Orchestrator, OrchestratorError, parse_config
from orchestrator.config import DEFAULT_CONFIG_NAME
from orchestrator.footprints import FootprintStore
from orchestrator.runtime.stats import percentile

DEFAULT_TIME_SCALE = 0.02
GOAL_SCALING = 0.90  # throughput within 10% of linear
GOAL_OVERHEAD_S = 0.002  # routing overhead per acquire
DEFAULT_PAUSE_S = 0.005  # between blocks, for the entry measured with its release apart


def machine_yaml(time_scale: float) -> str:
    """The scheduling benchmark's mixed-trace config (``design`` costs) at ``time_scale``, as
    YAML text (each machine parses its own)."""
    text = resources.files("orchestrator").joinpath("defaults", DEFAULT_CONFIG_NAME).read_text()
    raw = yaml.safe_load(text)
    raw.setdefault("simulation", {})["time_scale"] = time_scale
    sw = raw.setdefault("switching", {})
    sw["scheduling"] = "fair"
    sw["load_timeout_s"] = max(float(sw.get("load_timeout_s", 0.0)), 600.0)
    for m in raw["models"].values():
        m["max_concurrent"] = CAPACITY[m["kind"]]
        m["offload"] = False
        m.pop("host_gb", None)
    raw.setdefault("monitor", {})["footprints_path"] = None
    raw["monitor"]["sample_hz"] = 0
    return yaml.safe_dump(raw)


@dataclass
class Run:
    """One trace on ``machines`` machines (0: the local Orchestrator)."""

    machines: int
    requests: int
    served: int = 0
    errors: list[str] = field(default_factory=list)
    makespan_s: float = 0.0  # real seconds
    switches: int = 0
    waits_s: list[float] = field(default_factory=list)  # trace seconds (real / time scale)
    per_machine: dict[str, int] = field(default_factory=dict)  # requests served per machine
    waits_by_kind: dict[str, list[float]] = field(default_factory=dict)
    choices: dict[str, int] = field(default_factory=dict)  # why routing chose, per request
    over_budget: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.served / self.makespan_s if self.makespan_s else 0.0

    def figures(self) -> dict[str, Any]:
        waits = sorted(self.waits_s)
        return {
            "machines": self.machines,
            "requests": self.requests,
            "served": self.served,
            "errors": len(self.errors),
            "makespan_s": round(self.makespan_s, 3),
            "throughput_per_s": round(self.throughput, 2),
            "switches": self.switches,
            "p50_wait_s": round(percentile(waits, 0.5), 2) if waits else 0.0,
            "p99_wait_s": round(percentile(waits, 0.99), 2) if waits else 0.0,
            "per_machine": dict(sorted(self.per_machine.items())),
            "p99_wait_by_kind_s": {
                k: round(percentile(sorted(v), 0.99), 1) for k, v in sorted(self.waits_by_kind.items())
            },
            "choices": dict(sorted(self.choices.items())),
        }


def combined(traces: Sequence[Trace]) -> Trace:
    agents = tuple(a for t in traces for a in t.agents)
    return Trace("mixed", f"{len(traces)} x mixed", agents)


async def _agents(acquire: Any, trace: Trace, scale: float, run: Run) -> None:
    now = time.perf_counter

    async def agent(steps: Any) -> None:
        for step in steps:
            if step.think_s > 0:
                await anyio.sleep(step.think_s * scale)
            asked = now()
            try:
                async with acquire(step.model) as lease:
                    waited = (now() - asked) / scale
                    run.waits_s.append(waited)
                    run.waits_by_kind.setdefault(step.model, []).append(waited)
                    route = getattr(lease, "route", None)
                    if route is not None:
                        run.choices[route.choice.name] = run.choices.get(route.choice.name, 0) + 1
                    node = getattr(lease, "node", "local")
                    run.per_machine[node] = run.per_machine.get(node, 0) + 1
                    await anyio.sleep(step.work_s * scale)
                run.served += 1
            except OrchestratorError as exc:
                run.errors.append(f"{step.model}: {type(exc).__name__}: {exc}")

    t0 = now()
    async with anyio.create_task_group() as tg:
        for steps in trace.agents:
            tg.start_soon(agent, steps)
    run.makespan_s = now() - t0


async def run_local(trace: Trace, scale: float) -> Run:
    config = parse_config(machine_yaml(scale), source="<benchmark: local>")
    run = Run(0, trace.requests)
    async with Orchestrator(config, footprints=FootprintStore(None)) as orch:
        await _agents(orch.acquire, trace, scale, run)
        run.switches = orch.statistics().switches
        if orch.statistics().peak_committed_bytes > config.budget_bytes:
            run.over_budget.append("local")
    return run


async def run_cluster(names: Sequence[str], trace: Trace, scale: float, namespace: str) -> Run:
    from orchestrator.cluster import ClusterOrchestrator, Machine

    text = machine_yaml(scale)
    run = Run(len(names), trace.requests)
    machines = [Machine(n, config_text=text) for n in names]
    async with ClusterOrchestrator(machines, namespace=namespace) as cluster:
        await _agents(cluster.acquire, trace, scale, run)
        stats = await cluster.statistics()
        run.switches = sum(s["switches"] for s in stats.values())
        for n, s in stats.items():
            events = await cluster.events_of(n)
            if any(e["committed_bytes"] > e["budget_bytes"] for e in events):
                run.over_budget.append(n)
            if s["peak_committed_bytes"] > s["budget_bytes"]:
                run.over_budget.append(n)
    return run


def _ms(values: Sequence[float], q: float) -> float:
    return round(percentile(sorted(values), q) * 1000, 3)


async def overhead(
    names: Sequence[str], n: int, namespace: str, pause_s: float = DEFAULT_PAUSE_S
) -> dict[str, Any]:
    """Sequential acquires of a resident LLM: through the cluster and through a local one,
    back to back and with ``pause_s`` between blocks."""
    from orchestrator.cluster import ClusterOrchestrator, Machine
    from states.routing import RouteRequest, route

    text = machine_yaml(DEFAULT_TIME_SCALE)
    now = time.perf_counter
    out: dict[str, Any] = {"acquires": n, "pause_ms": round(pause_s * 1000, 3)}

    async def measure(acquire: Any, pause_s: float = 0.0) -> tuple[list[float], list[float]]:
        enter, cycle = [], []
        for _ in range(n):
            if pause_s:
                await anyio.sleep(pause_s)
            t0 = now()
            async with acquire("llm"):
                t1 = now()
            t2 = now()
            enter.append(t1 - t0)
            cycle.append(t2 - t0)
        return enter, cycle

    config = parse_config(text, source="<benchmark: local>")
    async with Orchestrator(config, footprints=FootprintStore(None)) as orch:
        async with orch.acquire("llm"):
            pass
        local_enter, local_cycle = await measure(orch.acquire)
        local_paused, _ = await measure(orch.acquire, pause_s)

    machines = [Machine(x, config_text=text) for x in names]
    async with ClusterOrchestrator(machines, namespace=namespace) as cluster:
        async with cluster.acquire("llm"):
            pass
        for _ in range(20):  # warm Ray's connections
            async with cluster.acquire("llm"):
                pass
        cluster_enter, cluster_cycle = await measure(cluster.acquire)
        cluster_paused, _ = await measure(cluster.acquire, pause_s)
        actor = cluster.actor(names[0])

        async def ping(pause_s: float = 0.0) -> list[float]:
            pings = []
            for _ in range(n):  # Ray's own round trip to the machine's actor, for reference
                if pause_s:
                    await anyio.sleep(pause_s)
                t0 = now()
                await actor.ping.remote()
                pings.append(now() - t0)
            return pings

        out["ray_round_trip_p50_ms"] = _ms(await ping(), 0.5)
        # (after a pause, each process of the call wakes from idle: on a busy machine that
        # costs more than the call itself)
        out["ray_round_trip_paused_p50_ms"] = _ms(await ping(pause_s), 0.5)
        views = cluster.views()
        t0 = now()
        k = 2000
        for _ in range(k):
            route(RouteRequest("llm"), views)
        route_s = (now() - t0) / k

    for label, values in (
        ("local_enter", local_enter),
        ("local_cycle", local_cycle),
        ("cluster_enter", cluster_enter),
        ("cluster_cycle", cluster_cycle),
        ("local_enter_paused", local_paused),
        ("cluster_enter_paused", cluster_paused),
    ):
        out[f"{label}_p50_ms"] = _ms(values, 0.5)
        out[f"{label}_p99_ms"] = _ms(values, 0.99)
    out["added_enter_p50_ms"] = round(out["cluster_enter_p50_ms"] - out["local_enter_p50_ms"], 3)
    out["added_cycle_p50_ms"] = round(out["cluster_cycle_p50_ms"] - out["local_cycle_p50_ms"], 3)
    out["added_enter_paused_p50_ms"] = round(
        out["cluster_enter_paused_p50_ms"] - out["local_enter_paused_p50_ms"], 3
    )
    out["route_decision_us"] = round(route_s * 1e6, 1)
    out["machines"] = len(names)
    return out


def _median_of(overs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each figure of several overhead runs: its median (of an even count, the upper one)."""
    out = dict(overs[0])
    for k, v in overs[0].items():
        if isinstance(v, float):
            out[k] = sorted(o[k] for o in overs)[len(overs) // 2]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds of the mixed trace (default 5)")
    p.add_argument("--machines", default="1,2,4", help="machine counts to run (default 1,2,4)")
    p.add_argument("--time-scale", type=float, default=DEFAULT_TIME_SCALE, help="default %(default)s")
    p.add_argument("--acquires", type=int, default=300, help="sequential acquires for the overhead")
    p.add_argument(
        "--pause-ms",
        type=float,
        default=DEFAULT_PAUSE_S * 1000,
        help="between blocks, for the entry measured with each release apart (default %(default)s)",
    )
    p.add_argument(
        "--overhead-only",
        action="store_true",
        help="only the routing overhead (no trace), on the largest of --machines",
    )
    p.add_argument("--repeat", type=int, default=1, help="measure the overhead this many times (default 1)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    counts = sorted({int(x) for x in args.machines.split(",")})
    if not counts or counts[0] < 1:
        p.error("--machines: positive counts, e.g. 1,2,4")
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError:
        raise SystemExit("the cluster benchmark needs Ray: pip install -e '.[ray]'") from None

    from orchestrator.cluster import machine_resource

    scale = args.time_scale
    names = [f"m{i}" for i in range(max(counts))]
    print(
        f"cluster benchmark: mixed trace ({'quick' if args.quick else 'full'}), time scale {scale:g}, "
        f"machines {counts}; python {platform.python_version()}, ray {version('ray')}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs"
    )
    t_start = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for n in names:
        cluster.add_node(num_cpus=1, num_gpus=1, resources={machine_resource(n): 1})
    ray.init(address=cluster.address, namespace="vram-orchestrator-bench", log_to_driver=False)
    cluster.wait_for_nodes()
    print(f"a local Ray cluster of {len(names)} machines up in {time.perf_counter() - t_start:.1f} s")
    runs: list[Run] = []
    overs: list[dict[str, Any]] = []
    try:
        if not args.overhead_only:
            one = make_trace("mixed", args.quick, args.seed)
            local = anyio.run(run_local, one, scale)
            runs.append(local)
            print(f"local Orchestrator: {json.dumps(local.figures())}", flush=True)
            for n in counts:
                trace = combined([make_trace("mixed", args.quick, args.seed + i) for i in range(n)])
                r = anyio.run(run_cluster, names[:n], trace, scale, f"bench-{n}")
                runs.append(r)
                print(f"{n} machine(s): {json.dumps(r.figures())}", flush=True)
        for i in range(max(1, args.repeat)):
            o = anyio.run(overhead, names, args.acquires, f"bench-overhead-{i}", args.pause_ms / 1000)
            overs.append(o)
            print(f"overhead: {json.dumps(o)}", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    over = _median_of(overs)

    base = next((r for r in runs if r.machines == 1), None)
    if runs:
        print("\nmachines  requests  served  makespan_s  req/s  vs linear  switches  p50 wait  p99 wait")
    for r in runs:
        f = r.figures()
        lin = (
            f"{r.throughput / (r.machines * base.throughput):.2f}"
            if base and r.machines and base.throughput
            else "-"
        )
        label = "local" if r.machines == 0 else str(r.machines)
        print(
            f"{label:>8}{f['requests']:>10}{f['served']:>8}{f['makespan_s']:>12.1f}{f['throughput_per_s']:>7.1f}"
            f"{lin:>11}{f['switches']:>10}{f['p50_wait_s']:>10.1f}{f['p99_wait_s']:>10.1f}"
        )
    enters = sorted(o["cluster_enter_p50_ms"] for o in overs)
    spread = (
        f"; each figure the median of {len(overs)} runs, enter p50 cluster from {enters[0]} "
        f"to {enters[-1]} ms"
        if len(overs) > 1
        else ""
    )
    print(
        f"\nper acquire of a resident model ({over['acquires']} sequential{spread}): enter p50 local "
        f"{over['local_enter_p50_ms']} ms, cluster {over['cluster_enter_p50_ms']} ms (added "
        f"{over['added_enter_p50_ms']} ms); acquire + release p50 local {over['local_cycle_p50_ms']} ms, "
        f"cluster {over['cluster_cycle_p50_ms']} ms (added {over['added_cycle_p50_ms']} ms); p99 enter "
        f"cluster {over['cluster_enter_p99_ms']} ms; with {over['pause_ms']:g} ms between blocks (each "
        f"release in a call of its own) enter p50 local {over['local_enter_paused_p50_ms']} ms, cluster "
        f"{over['cluster_enter_paused_p50_ms']} ms (p99 {over['cluster_enter_paused_p99_ms']} ms); the "
        f"routing decision {over['route_decision_us']} us; one Ray round trip to a machine's actor (a ping) "
        f"{over['ray_round_trip_p50_ms']} ms, after the same pause {over['ray_round_trip_paused_p50_ms']} ms"
    )
    scaling = {
        str(r.machines): round(r.throughput / (r.machines * base.throughput), 3)
        for r in runs
        if base and r.machines and base.throughput
    }
    goal_scaling = all(v >= GOAL_SCALING for v in scaling.values())
    goal_overhead = over["added_enter_p50_ms"] / 1000 < GOAL_OVERHEAD_S
    print(
        f"goals: throughput within 10% of linear: "
        f"{('met' if goal_scaling else 'NOT met') if scaling else 'not measured'} ({scaling}); "
        f"under 2 ms added per acquire (entering the block): {'met' if goal_overhead else 'NOT met'}; "
        f"wall time {time.perf_counter() - t_start:.1f} s"
    )
    bad = [r for r in runs if r.errors or r.served != r.requests or r.over_budget]
    for r in bad:
        print(
            f"  !! {r.machines} machine(s): {len(r.errors)} errors, {r.requests - r.served} unserved, "
            f"over budget on {r.over_budget}; first error: {r.errors[:1]}"
        )
    if args.json:
        doc = {
            "quick": args.quick,
            "time_scale": scale,
            "runs": [{**r.figures(), "over_budget": r.over_budget} for r in runs],
            "scaling": scaling,
            "overhead": over,
            "overhead_runs": overs,
            "cpus": os.cpu_count(),
            "waits_s": {str(r.machines): sorted(r.waits_s) for r in runs},
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
