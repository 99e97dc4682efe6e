"""Several cards on a real GPU: placement onto cuda:N with real tensors, NVML read per card,
and a config that would count one card twice refused.

Run on a machine with CUDA: ``pytest tests/gpu/test_multigpu_gpu.py -v -s``. With one card the
two-card part is skipped; the rest runs.
"""

from __future__ import annotations

import pytest

from orchestrator import ConfigError, Orchestrator, parse_config
from orchestrator.device.nvml import NvmlDevice, discover_cards
from states.units import GIB, format_gib

pytestmark = pytest.mark.anyio

MODELS = """
monitor: {footprints_path: null}
switching: {load_timeout_s: 60, unload_timeout_s: 10}
models:
  tts-a: {kind: tts, vram_gb: 2, backend: synthetic}
  tts-b: {kind: tts, vram_gb: 3, backend: synthetic}
"""


def card_gib(index: int) -> float:
    dev = NvmlDevice(index)
    try:
        return dev.total_bytes / GIB
    finally:
        dev.close()


async def test_two_synthetic_models_on_cuda_0_are_read_by_nvml_on_that_card() -> None:
    total = card_gib(0)
    text = f"hardware: {{device: nvml, gpus: [{{index: 0, total_vram_gb: {total}, safe_max_vram_gb: 16}}]}}"
    orch = Orchestrator(parse_config(text + MODELS, source="<gpu test>"))
    dev = orch.devices[0]
    async with orch:
        base = dev.used_bytes()
        async with orch.acquire("tts-a") as a, orch.acquire("tts-b") as b:
            assert a.device is not None and a.device.index == 0
            assert b.device is not None and b.device.index == 0
            used = dev.used_bytes() - base
            committed = orch.cards().ledger(0).committed_bytes
            print(f"\ncuda:0 NVML: +{format_gib(used)}; the ledger commits {format_gib(committed)}")
            assert committed == 5 * GIB
            # the tensors are on card 0: NVML sees them there (allocator rounding aside)
            assert abs(used - 5 * GIB) < 512 * 2**20
    assert dev.used_bytes() - base < 512 * 2**20  # released at shutdown


async def test_two_cards_serve_two_models_at_once_each_on_its_own_card() -> None:
    cards = discover_cards()
    if len(cards) < 2:
        pytest.skip(f"this machine has {len(cards)} GPU: the two-card part needs two")
    gpus = ", ".join(
        f"{{index: {i}, total_vram_gb: {t / GIB}, safe_max_vram_gb: 4}}" for i, _, t in cards[:2]
    )
    text = f"hardware: {{device: nvml, gpus: [{gpus}]}}"
    orch = Orchestrator(parse_config(text + MODELS.replace("kind: tts", "kind: llm"), source="<gpu test>"))
    async with orch:
        base = {g: d.used_bytes() for g, d in orch.devices.items()}
        async with orch.acquire("tts-a") as a, orch.acquire("tts-b") as b:
            assert a.device is not None and b.device is not None
            assert {a.device.index, b.device.index} == {0, 1}  # two heavy models, two cards, at once
            for g, d in orch.devices.items():
                grew = d.used_bytes() - base[g]
                print(f"\ncuda:{g} NVML: +{format_gib(grew)}")
                assert grew > GIB


def test_a_card_listed_twice_is_refused_on_a_real_device() -> None:
    total = card_gib(0)
    text = f"hardware: {{device: nvml, total_vram_gb: {total}, safe_max_vram_gb: 16, gpus: [0, 0]}}"
    with pytest.raises(ConfigError, match="lists card 0 twice"):
        parse_config(text + MODELS, source="<gpu test>")


def test_a_card_the_machine_lacks_is_a_clear_error() -> None:
    n = len(discover_cards())
    text = f"hardware: {{device: nvml, total_vram_gb: 80, safe_max_vram_gb: 16, gpus: [0, {n}]}}"
    config = parse_config(text + MODELS, source="<gpu test>")
    with pytest.raises(ConfigError, match=f"GPU index {n} does not exist"):
        Orchestrator(config)
