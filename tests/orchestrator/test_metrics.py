"""Prometheus metrics: a real orchestrator on the simulated device, the exposition parsed back."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import anyio
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import orchestrator.config
from orchestrator.backends.simulated import SimulatedBackend
from orchestrator.errors import AcquireTimeout, LoadFailed
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.runtime import Orchestrator
from states.units import gib_to_bytes

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def fast_orch() -> Orchestrator:
    """The embedded default (the Model Management Module's models), 1000x faster."""
    return Orchestrator(dataclasses.replace(orchestrator.config.load_config(None), time_scale=0.001))


def samples(metrics: OrchestratorMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} from the text exposition."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: OrchestratorMetrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, frozenset(labels.items()))]


def total(metrics: OrchestratorMetrics, name: str) -> float:
    return sum(v for (n, _), v in samples(metrics).items() if n == name)


def iter_states(metrics: OrchestratorMetrics) -> Iterator[tuple[str, float]]:
    for (n, labels), v in samples(metrics).items():
        if n == "vram_orchestrator_state":
            yield dict(labels)["vram_orchestrator_state"], v


def current_state(metrics: OrchestratorMetrics) -> str:
    (state,) = [s for s, v in iter_states(metrics) if v == 1]
    return state


async def test_metrics_follow_a_short_run() -> None:
    orch = fast_orch()
    metrics = OrchestratorMetrics(orch)
    assert current_state(metrics) == "IDLE"
    assert value(metrics, "vram_orchestrator_budget_bytes", gpu="0") == gib_to_bytes(15.5)
    assert value(metrics, "vram_orchestrator_committed_bytes", gpu="0") == 0
    async with orch:
        async with orch.acquire("llm"):
            assert current_state(metrics) == "LLM_ACTIVE"
            assert value(
                metrics, "vram_orchestrator_resident_bytes", model="qwen-14b", kind="llm", tier="gpu", gpu="0"
            ) == gib_to_bytes(11.5)
            assert value(metrics, "vram_orchestrator_active_leases", model="qwen-14b") == 1
        async with orch.acquire("sdxl"), orch.acquire("tts"):  # TTS rides along with SDXL
            assert current_state(metrics) == "SDXL_ACTIVE"
            gpu = {
                dict(labels)["model"]: v
                for (n, labels), v in samples(metrics).items()
                if n == "vram_orchestrator_resident_bytes" and dict(labels)["tier"] == "gpu" and v
            }
            assert gpu == {"sdxl-base": gib_to_bytes(10.5), "gpt-sovits-small": gib_to_bytes(3.5)}
            assert value(metrics, "vram_orchestrator_committed_bytes", gpu="0") == gib_to_bytes(14.0)
            assert value(metrics, "vram_orchestrator_active_leases", model="gpt-sovits-small") == 1
            assert value(metrics, "vram_orchestrator_active_leases", model="qwen-14b") == 0
            assert total(metrics, "vram_orchestrator_queue_depth") == 0
        # The LLM comes back: SDXL (offload: true) keeps a host copy.
        async with orch.acquire("llm"):
            assert value(
                metrics,
                "vram_orchestrator_resident_bytes",
                model="sdxl-base",
                kind="sdxl",
                tier="host",
                gpu="0",
            ) == gib_to_bytes(6.5)
            assert (
                value(
                    metrics,
                    "vram_orchestrator_resident_bytes",
                    model="sdxl-base",
                    kind="sdxl",
                    tier="gpu",
                    gpu="0",
                )
                == 0
            )
        stats = orch.statistics()

    assert stats.switches == 4  # qwen, sdxl, tts beside it, qwen again
    assert total(metrics, "vram_orchestrator_switches_total") == stats.switches
    assert value(metrics, "vram_orchestrator_switches_total", model="qwen-14b") == 2
    assert total(metrics, "vram_orchestrator_switch_failures_total") == 0
    # The shutdown's unload-everything is not a switch; every real one was observed.
    assert total(metrics, "vram_orchestrator_switch_duration_seconds_count") == stats.switches
    assert (
        value(metrics, "vram_orchestrator_switch_duration_seconds_count", model="qwen-14b", outcome="ok") == 2
    )
    # statistics() times the switch apart from the event's duration: a few microseconds off.
    assert total(metrics, "vram_orchestrator_switch_duration_seconds_sum") == pytest.approx(
        stats.switching_s, abs=0.005
    )
    assert total(metrics, "vram_orchestrator_lease_wait_seconds_count") == stats.grants == 4
    # A grant event's wait ends at the grant; statistics() times it when the waiter wakes.
    assert (
        0
        < total(metrics, "vram_orchestrator_lease_wait_seconds_sum")
        <= stats.waits.mean_s * stats.waits.count
    )
    assert value(metrics, "vram_orchestrator_loads_total", model="qwen-14b", source="disk") == 2
    assert (
        value(
            metrics, "vram_orchestrator_evictions_total", model="sdxl-base", from_tier="gpu", to_tier="host"
        )
        == 1
    )
    # After the shutdown nothing is resident and the machine is IDLE again.
    assert current_state(metrics) == "IDLE"
    assert value(metrics, "vram_orchestrator_committed_bytes", gpu="0") == 0
    assert value(metrics, "vram_orchestrator_device_used_bytes", gpu="0") == 0


async def test_timeouts_cancellations_and_failures_are_counted() -> None:
    orch = fast_orch()
    metrics = OrchestratorMetrics(orch)
    async with orch:
        held, done = anyio.Event(), anyio.Event()

        async def hold_the_llm() -> None:
            async with orch.acquire("llm"):
                held.set()
                await done.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold_the_llm)
            await held.wait()
            # A busy LLM keeps the GPU for fairness_s (5 s): SDXL cannot come in meanwhile.
            with pytest.raises(AcquireTimeout):
                async with orch.acquire("sdxl", timeout=0.01):
                    pass
            with anyio.move_on_after(0.01):
                async with orch.acquire("sdxl"):
                    pass

            async def wait_for_sdxl() -> None:  # served once the LLM is free
                async with orch.acquire("sdxl"):
                    pass

            tg.start_soon(wait_for_sdxl)
            await anyio.sleep(0.01)
            # The waiter shows in the queue depth.
            assert value(metrics, "vram_orchestrator_queue_depth", model="sdxl-base") == 1
            done.set()
        # (The SDXL waiter above got SDXL once the LLM was free: fail another model's load.)
        backend = orch.backends["sdxl-lora"]
        assert isinstance(backend, SimulatedBackend)
        backend.faults.fail_loads = 1
        with pytest.raises(LoadFailed):
            async with orch.acquire("sdxl-lora"):
                pass

    assert value(metrics, "vram_orchestrator_acquire_timeouts_total", model="sdxl-base") == 1
    assert value(metrics, "vram_orchestrator_acquire_cancellations_total", model="sdxl-base") == 1
    assert value(metrics, "vram_orchestrator_acquire_timeouts_total", model="qwen-14b") == 0
    assert value(metrics, "vram_orchestrator_switch_failures_total", model="sdxl-lora") == 1
    assert (
        value(metrics, "vram_orchestrator_switch_duration_seconds_count", model="sdxl-lora", outcome="failed")
        == 1
    )
    assert value(metrics, "vram_orchestrator_switches_total", model="sdxl-lora") == 0


async def test_each_orchestrator_has_its_own_registry() -> None:
    """Two orchestrators' metrics side by side: no clash, nothing in the global registry."""
    a, b = fast_orch(), fast_orch()
    ma, mb = OrchestratorMetrics(a), OrchestratorMetrics(b)
    assert ma.registry is not mb.registry
    assert not any(name.startswith("vram_orchestrator") for name in REGISTRY._names_to_collectors)
    async with a:
        async with a.acquire("tts"):
            pass
    assert total(ma, "vram_orchestrator_switches_total") == 1
    assert total(mb, "vram_orchestrator_switches_total") == 0
    ma.detach()
    async with a:
        async with a.acquire("tts"):
            pass
    assert total(ma, "vram_orchestrator_switches_total") == 1  # detached: no longer counting
    info = samples(ma)[
        (
            "vram_orchestrator_device_info",
            frozenset({("name", a.device.name), ("source", "simulated"), ("gpu", "0")}),
        )
    ]
    assert info == 1
    assert ma.content_type.startswith("text/plain")


TWO_CARDS = """\
hardware:
  device: simulated
  gpus:
    - {index: 0, total_vram_gb: 24, safe_max_vram_gb: 23}
    - {index: 1, total_vram_gb: 16, safe_max_vram_gb: 15}
simulation: {time_scale: 0.001}
switching: {host_ram_budget_gb: 16}
models:
  qwen-14b: {kind: llm, vram_gb: 11.5, gpus: [0]}
  big-llm: {kind: llm, vram_gb: 26, tensor_parallel: 2}
  sdxl-base: {kind: sdxl, vram_gb: 10.5, gpus: [1], offload: true, host_gb: 6.5}
defaults: {llm: qwen-14b}
"""


def series(metrics: OrchestratorMetrics, name: str, **labels: str) -> dict[str, float]:
    """{gpu label: value} of the samples of ``name`` that carry ``labels``."""
    want = set(labels.items())
    return {dict(lab)["gpu"]: v for (n, lab), v in samples(metrics).items() if n == name and want <= set(lab)}


async def test_every_vram_gauge_is_per_card() -> None:
    orch = Orchestrator(orchestrator.config.parse_config(TWO_CARDS, source="<two cards>"))
    metrics = OrchestratorMetrics(orch)
    assert series(metrics, "vram_orchestrator_budget_bytes") == {"0": gib_to_bytes(23), "1": gib_to_bytes(15)}
    assert series(metrics, "vram_orchestrator_device_total_bytes") == {
        "0": gib_to_bytes(24),
        "1": gib_to_bytes(16),
    }
    assert value(metrics, "vram_orchestrator_host_budget_bytes") == gib_to_bytes(16)
    # A model restricted to one card has series for that card only; a spanning one on both.
    sdxl = series(metrics, "vram_orchestrator_resident_bytes", model="sdxl-base", tier="gpu")
    assert sdxl == {"1": 0}
    assert set(series(metrics, "vram_orchestrator_resident_bytes", model="big-llm", tier="gpu")) == {"0", "1"}
    async with orch:
        async with orch.acquire("qwen-14b"), orch.acquire("sdxl-base"):
            assert series(metrics, "vram_orchestrator_committed_bytes") == {
                "0": gib_to_bytes(11.5),
                "1": gib_to_bytes(10.5),
            }
            states = {
                dict(lab)["gpu"]: dict(lab)["vram_orchestrator_state"]
                for (n, lab), v in samples(metrics).items()
                if n == "vram_orchestrator_state" and v == 1
            }
            assert states == {"0": "LLM_ACTIVE", "1": "SDXL_ACTIVE"}
            assert series(metrics, "vram_orchestrator_resident_bytes", model="qwen-14b", tier="gpu") == {
                "0": gib_to_bytes(11.5)
            }
            assert series(metrics, "vram_orchestrator_device_used_bytes") == {
                "0": gib_to_bytes(11.5),
                "1": gib_to_bytes(10.5),
            }
        # The spanning model takes both cards: its share on each; SDXL's host copy is
        # labelled with the card it left.
        async with orch.acquire("big-llm"):
            share = orch.config.models["big-llm"].card_bytes
            big = series(metrics, "vram_orchestrator_resident_bytes", model="big-llm", tier="gpu")
            assert big == {"0": share, "1": share}
            host = series(metrics, "vram_orchestrator_resident_bytes", model="sdxl-base", tier="host")
            assert host == {"1": gib_to_bytes(6.5)}
            assert series(metrics, "vram_orchestrator_committed_bytes") == {"0": share, "1": share}


def test_one_card_is_labelled_with_its_configured_index() -> None:
    text = (
        "hardware: {device: simulated, index: 2, safe_max_vram_gb: 15.5}\n"
        "models: {m: {kind: llm, vram_gb: 4}}"
    )
    orch = Orchestrator(orchestrator.config.parse_config(text, source="<index 2>"))
    metrics = OrchestratorMetrics(orch)
    assert series(metrics, "vram_orchestrator_budget_bytes") == {"2": gib_to_bytes(15.5)}
    assert series(metrics, "vram_orchestrator_resident_bytes", model="m", tier="gpu") == {"2": 0}
