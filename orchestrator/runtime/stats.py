"""Counters since the orchestrator started, and the frozen ``Statistics`` read from them."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from states.machine import State
from states.units import format_gib

WAIT_SAMPLES = 10_000  # the latest waits kept for the percentiles in statistics()


@dataclass(frozen=True)
class WaitStats:
    """Lease waits: count, mean and max since the start; p50/p99 over the latest 10,000."""

    count: int
    mean_s: float
    p50_s: float
    p99_s: float
    max_s: float

    def __str__(self) -> str:
        if not self.count:
            return "no lease granted yet"
        return (
            f"{self.count} granted; mean {self.mean_s:.3f} s, p50 {self.p50_s:.3f} s, "
            f"p99 {self.p99_s:.3f} s, max {self.max_s:.3f} s"
        )


@dataclass(frozen=True)
class Statistics:
    """Counters since the orchestrator started (``orch.statistics()``).

    ``print(orch.statistics())`` gives a short readable summary (GiB and seconds); the fields
    hold the raw figures (bytes, seconds).
    """

    state: State
    switches: int  # switches that completed (the first cold load and side loads included)
    failed_switches: int
    loads: int  # cold loads from disk
    restores: int  # restores from the host tier
    evictions: int
    grants: int
    releases: int
    timeouts: int
    cancellations: int
    active_leases: Mapping[str, int]
    waiting: Mapping[str, int]
    switching_s: float  # time spent inside switches
    waits: WaitStats
    peak_committed_bytes: int
    exchanges: int = 0  # switches that took the GPU from another model (evicted one)

    def __str__(self) -> str:
        def per_model(counts: Mapping[str, int]) -> str:
            return ", ".join(f"{m} {n}" for m, n in sorted(counts.items())) or "none"

        lines = [
            f"state {self.state.name}",
            f"switches {self.switches} ({self.exchanges} took the GPU from another model, "
            f"{self.failed_switches} failed), {self.switching_s:.2f} s switching",
            f"loads {self.loads}, restores {self.restores}, evictions {self.evictions}",
            f"leases: {self.grants} granted, {self.releases} released, {self.timeouts} timed out, "
            f"{self.cancellations} cancelled",
            f"waits: {self.waits}",
            f"active leases: {per_model(self.active_leases)}; waiting: {per_model(self.waiting)}",
            f"peak committed {format_gib(self.peak_committed_bytes)}",
        ]
        return "\n".join(lines)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


@dataclass
class Counters:
    """The runtime's running totals (mutable; ``snapshot`` freezes them)."""

    switches: int = 0
    exchanges: int = 0
    failed_switches: int = 0
    loads: int = 0
    restores: int = 0
    evictions: int = 0
    grants: int = 0
    releases: int = 0
    timeouts: int = 0
    cancellations: int = 0
    switching_s: float = 0.0
    peak_committed_bytes: int = 0
    # The latest waits, for percentiles (bounded: a daemon runs for months), and totals.
    wait_times: deque[float] = field(default_factory=lambda: deque(maxlen=WAIT_SAMPLES))
    wait_count: int = 0
    wait_sum_s: float = 0.0
    wait_max_s: float = 0.0

    def record_wait(self, waited_s: float) -> None:
        self.wait_times.append(waited_s)
        self.wait_count += 1
        self.wait_sum_s += waited_s
        self.wait_max_s = max(self.wait_max_s, waited_s)

    def snapshot(self, state: State, active: Mapping[str, int], waiting: Mapping[str, int]) -> Statistics:
        waits = sorted(self.wait_times)
        return Statistics(
            state=state,
            switches=self.switches,
            failed_switches=self.failed_switches,
            loads=self.loads,
            restores=self.restores,
            evictions=self.evictions,
            grants=self.grants,
            releases=self.releases,
            timeouts=self.timeouts,
            cancellations=self.cancellations,
            active_leases=dict(active),
            waiting=dict(waiting),
            switching_s=self.switching_s,
            waits=WaitStats(
                count=self.wait_count,
                mean_s=self.wait_sum_s / self.wait_count if self.wait_count else 0.0,
                p50_s=percentile(waits, 0.50),
                p99_s=percentile(waits, 0.99),
                max_s=self.wait_max_s,
            ),
            peak_committed_bytes=self.peak_committed_bytes,
            exchanges=self.exchanges,
        )
