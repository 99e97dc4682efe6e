"""Prometheus metrics for one orchestrator, in a registry of its own.

Two sources, chosen by what each metric is:

- Levels (state, resident bytes per model and tier, budget, foreign and committed bytes,
  queue depth, active leases, device memory) are read from the orchestrator *at scrape
  time* by a custom collector: ``orch.cards()`` is a frozen snapshot, so a scrape is always
  current and never sees a half-made change. Every VRAM level is per card, with a ``gpu``
  label (the card's index; ``gpu="0"`` on a machine with one card at index 0), so
  ``sum without (gpu) (...)`` gives the machine's totals.
- Happenings (switches and their durations, failed switches, lease waits, timeouts,
  cancellations, loads, evictions) are counted from the orchestrator's events by a listener.
  They count from the moment the metrics are attached.

Every metric lives in ``metrics.registry`` (a ``CollectorRegistry`` of its own, never the
global one), so several orchestrators, or several tests, never clash::

    metrics = OrchestratorMetrics(orch)
    text = metrics.render()                      # the text exposition format

    from prometheus_client import start_http_server
    start_http_server(9400, registry=metrics.registry)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric, StateSetMetricFamily
from prometheus_client.registry import Collector

from orchestrator.events import Event
from states.ledger import Tier
from states.machine import State

if TYPE_CHECKING:
    from orchestrator.runtime import Orchestrator

PREFIX = "vram_orchestrator"

# A switch takes from ~0.1 s (a restore from host RAM) to a minute (a cold vLLM start).
SWITCH_BUCKETS_S: Sequence[float] = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
# A lease is granted in microseconds when its model is resident, and waits for switches
# (and for the fairness bound) otherwise.
WAIT_BUCKETS_S: Sequence[float] = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

_T = TypeVar("_T")


def _read(fn: Callable[[], _T]) -> _T:
    """Call a reader of the orchestrator's live containers from a scrape thread.

    ``orch.leases()`` and ``orch.waiting()`` iterate containers that the event loop changes;
    read from another thread (``start_http_server``), such an iteration can fail with
    "changed size during iteration". It is cheap to try again.
    """
    for _ in range(4):
        try:
            return fn()
        except RuntimeError:
            continue
    return fn()


class _LevelCollector(Collector):
    """Everything read from the orchestrator when scraped."""

    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch

    def collect(self) -> Iterator[Metric]:
        orch = self.orch
        cards = orch.cards()
        states = orch.states()
        models = list(orch.config.models)

        # Each card's state machine, budget and device, labelled with its index (gpu="0" on
        # a machine with one card): sum(...) over gpu gives the machine's totals.
        state = StateSetMetricFamily(
            f"{PREFIX}_state", "Each card's state machine's state (1 for the current one).", labels=["gpu"]
        )
        for card, _led in cards:
            state.add_metric([str(card.index)], {s.name: s is states[card.index] for s in State})
        yield state

        device = InfoMetricFamily(
            f"{PREFIX}_device", "Each card's device and where its numbers come from.", labels=["gpu"]
        )
        for card, _led in cards:
            dev = orch.devices[card.index]
            device.add_metric([str(card.index)], {"name": str(dev.name), "source": str(dev.source)})
        yield device

        per_card: list[tuple[str, str, list[int]]] = [
            ("budget_bytes", "The card's VRAM budget (safe_max_vram_gb).",
             [led.budget_bytes for _, led in cards]),
            ("committed_bytes", "VRAM held by residents plus the load in progress.",
             [led.committed_bytes for _, led in cards]),
            ("foreign_bytes", "VRAM held by processes the orchestrator does not own.",
             [led.foreign_bytes for _, led in cards]),
            ("device_total_bytes", "The card's total memory.",
             [orch.devices[g].total_bytes for g in cards.indexes]),
        ]  # fmt: skip
        for name, doc, values in per_card:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["gpu"])
            for gpu, v in zip(cards.indexes, values, strict=True):
                family.add_metric([str(gpu)], v)
            yield family
        yield GaugeMetricFamily(
            f"{PREFIX}_host_budget_bytes",
            "Room for host-RAM copies of evicted models (shared by every card).",
            value=cards.host_budget_bytes,
        )

        used = GaugeMetricFamily(
            f"{PREFIX}_device_used_bytes", "Memory in use on the card, by anyone.", labels=["gpu"]
        )
        for card, _led in cards:
            try:
                used.add_metric([str(card.index)], orch.devices[card.index].used_bytes())
            except Exception:  # a card that cannot be read now leaves its sample out of this scrape
                continue
        yield used

        # One series per model, tier and card it may use, zero where the model is not, so
        # that a model's series do not come and go with its residency. A host copy is shown
        # on the card it left (a spanning model's: on its first card).
        resident = GaugeMetricFamily(
            f"{PREFIX}_resident_bytes",
            "Bytes a model holds per tier and card: VRAM on the card, host RAM for its host copy "
            "(labelled with the card it left).",
            labels=["model", "kind", "tier", "gpu"],
        )
        for name in models:
            spec = orch.config.models[name]
            allowed = cards.indexes if spec.gpus is None else spec.gpus
            host_gpu = cards.host_gpu(name)
            for gpu in allowed:
                r = cards.ledger(gpu).get(name)
                on_gpu = r.vram_bytes if r is not None and r.tier is Tier.GPU else 0
                on_host = r.host_bytes if r is not None and r.tier is Tier.HOST and host_gpu == gpu else 0
                resident.add_metric([name, spec.kind, Tier.GPU.value, str(gpu)], on_gpu)
                resident.add_metric([name, spec.kind, Tier.HOST.value, str(gpu)], on_host)
        yield resident

        loading = GaugeMetricFamily(
            f"{PREFIX}_loading_bytes",
            "VRAM committed to the load in progress on the card.",
            labels=["model", "gpu"],
        )
        for card, led in cards:
            if led.loading is not None:
                loading.add_metric([led.loading.model, str(card.index)], led.loading.vram_bytes)
        yield loading

        waiting = _read(orch.waiting)
        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Tasks waiting for a lease, per model.", labels=["model"]
        )
        for name in models:
            depth.add_metric([name], sum(1 for w in waiting if w[0] == name))
        yield depth

        held = _read(lambda: dict(orch.leases()))
        leases = GaugeMetricFamily(f"{PREFIX}_active_leases", "Leases held now, per model.", labels=["model"])
        for name in models:
            leases.add_metric([name], held.get(name, 0))
        yield leases

    def describe(self) -> Iterable[Metric]:
        return []  # not known without reading the orchestrator; collect() is cheap


class OrchestratorMetrics:
    """Prometheus metrics of one orchestrator.

    :param orch: the orchestrator to watch (running or not; events count from now on).
    :param registry: where the metrics go; by default a new ``CollectorRegistry``.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        orch: Orchestrator,
        registry: CollectorRegistry | None = None,
        *,
        switch_buckets_s: Sequence[float] = SWITCH_BUCKETS_S,
        wait_buckets_s: Sequence[float] = WAIT_BUCKETS_S,
    ) -> None:
        self.orch = orch
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(_LevelCollector(orch))
        r = self.registry
        self.switches = Counter(
            f"{PREFIX}_switches", "Switches that completed, per target model.", ["model"], registry=r
        )
        self.switch_failures = Counter(
            f"{PREFIX}_switch_failures", "Switches that failed, per target model.", ["model"], registry=r
        )
        self.switch_duration = Histogram(
            f"{PREFIX}_switch_duration_seconds",
            "How long switches took (evictions and the load), by outcome.",
            ["model", "outcome"],
            buckets=switch_buckets_s,
            registry=r,
        )
        self.lease_wait = Histogram(
            f"{PREFIX}_lease_wait_seconds",
            "How long granted leases waited, from acquire() to the grant.",
            ["model"],
            buckets=wait_buckets_s,
            registry=r,
        )
        self.timeouts = Counter(
            f"{PREFIX}_acquire_timeouts", "acquire() calls that timed out.", ["model"], registry=r
        )
        self.cancellations = Counter(
            f"{PREFIX}_acquire_cancellations",
            "acquire() calls cancelled while waiting.",
            ["model"],
            registry=r,
        )
        self.loads = Counter(
            f"{PREFIX}_loads",
            "Models brought onto the GPU, by where from (disk: a cold load; host: a restore).",
            ["model", "source"],
            registry=r,
        )
        self.evictions = Counter(
            f"{PREFIX}_evictions",
            "Models moved off a tier (gpu -> host, gpu -> disk, host -> disk).",
            ["model", "from_tier", "to_tier"],
            registry=r,
        )
        # Every model's counters exist from the start (at zero), so that rate() and
        # increase() see the first switch, failure or timeout of a model too.
        for name in orch.config.models:
            for c in (self.switches, self.switch_failures, self.timeouts, self.cancellations):
                c.labels(name)
        self._remove = orch.add_listener(self._on_event)

    def detach(self) -> None:
        """Stop counting events (the scrape-time values stay readable)."""
        self._remove()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (serve with ``content_type``)."""
        return generate_latest(self.registry)

    # -- the event listener (runs inline in the orchestrator: cheap, never raises) ------------

    def _on_event(self, e: Event) -> None:
        model = e.model or ""
        if e.kind == "transition":
            # The shutdown's unload-everything has no target (model None): it is not a
            # switch in statistics() either, and counting it would skew the durations.
            if e.model is None or e.trigger not in ("finish_switch", "fail_switch"):
                return
            ok = e.trigger == "finish_switch"
            (self.switches if ok else self.switch_failures).labels(model).inc()
            if e.duration_s is not None:
                self.switch_duration.labels(model, "ok" if ok else "failed").observe(e.duration_s)
        elif e.kind == "grant":
            if e.duration_s is not None:  # the wait, from acquire() to the grant
                self.lease_wait.labels(model).observe(e.duration_s)
        elif e.kind == "timeout":
            self.timeouts.labels(model).inc()
        elif e.kind == "cancel":
            self.cancellations.labels(model).inc()
        elif e.kind == "load":
            # detail: "from disk" or "from host"
            source = (e.detail or "").removeprefix("from ").strip() or "unknown"
            self.loads.labels(model, source).inc()
        elif e.kind == "evict":
            # detail: "gpu -> host for sdxl-base", "host -> disk (shutdown)", or a leftover note
            from_tier, to_tier = _tiers(e.detail)
            self.evictions.labels(model, from_tier, to_tier).inc()


def _tiers(detail: str | None) -> tuple[str, str]:
    words = (detail or "").split()
    tiers = {t.value for t in Tier}
    if len(words) >= 3 and words[1] == "->" and words[0] in tiers and words[2] in tiers:
        return words[0], words[2]
    return "gpu", "disk"  # "left over by a failed cleanup: unloaded" frees device memory
