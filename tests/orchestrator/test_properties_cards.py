"""The hypothesis stateful test on several cards: random machines of 1-4 simulated cards of
different sizes, random acquires, cancellations, faults and foreign memory on each card.

After every step and at every event: no card's committed bytes pass its budget, and no card's
device ever held more than its budget; a spanning (tensor-parallel) model is resident on all
its cards or on none; each card's state matches what is resident on it outside a switch; no
lease or waiter is lost; every client finishes; nothing is left on any card at the end.
"""

from __future__ import annotations

import os

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import initialize

from orchestrator.config import Config, parse_config
from orchestrator.testing import CardsMachine, machine_for

SETTINGS = settings(
    max_examples=int(os.environ.get("PROPERTY_EXAMPLES", "25")),
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

CARD_SIZES_GIB = (16, 24, 20, 12)  # a card the largest model does not fit (12) is among them


def machine_config(sizes: list[int], restrict: bool, span: bool) -> Config:
    """Models of the Model Management Module's sizes on cards of ``sizes`` GiB; with
    ``restrict`` one model may use only the last card; with ``span`` an LLM spans two cards."""
    cards = ", ".join(
        f"{{index: {i}, total_vram_gb: {s}, safe_max_vram_gb: {s - 0.5}}}" for i, s in enumerate(sizes)
    )
    last = len(sizes) - 1
    sdxl_gpus = f", gpus: [{last}]" if restrict and sizes[last] >= 12 else ""
    tp = (
        "\n  llm-70b: {kind: llm, vram_gb: 20, tensor_parallel: 2}"
        if span and len(sizes) >= 2 and sorted(sizes)[-2] - 0.5 >= 10.5
        else ""
    )
    return parse_config(
        f"""
hardware: {{device: simulated, gpus: [{cards}]}}
switching: {{host_ram_budget_gb: 12, max_wait_s: 120, retry_backoff_s: 1.0}}
monitor: {{footprints_path: null}}
models:
  qwen-14b: {{kind: llm, vram_gb: 11.5}}
  qwen-vl-7b: {{kind: llm, vram_gb: 13.8}}
  sdxl-base: {{kind: sdxl, vram_gb: 10.5, offload: true, host_gb: 6.5{sdxl_gpus}}}
  sdxl-lora: {{kind: sdxl, vram_gb: 11.5, offload: true, host_gb: 6.7}}
  gpt-sovits-small: {{kind: tts, vram_gb: 3.5, offload: true, host_gb: 2.0}}{tp}
""",
        source="<property test: several cards>",
    )


class RandomMachines(CardsMachine):
    config = machine_config([16, 24], False, False)  # replaced by each example's own

    @initialize(
        sizes=st.lists(st.sampled_from(CARD_SIZES_GIB), min_size=1, max_size=4).filter(
            lambda s: max(s) >= 16
        ),
        restrict=st.booleans(),
        span=st.booleans(),
    )
    def start(self, sizes: list[int], restrict: bool, span: bool) -> None:  # type: ignore[override]
        self.start_on(machine_config(sizes, restrict, span))


TestSeveralCards = RandomMachines.TestCase
TestSeveralCards.settings = SETTINGS


# A workstation's two cards with a model spanning both and a light model kept to the smaller
# one (how `vram-orchestrator check` tests such a config).
WORKSTATION = parse_config(
    """
hardware: {device: simulated, gpus: [{index: 0, total_vram_gb: 24, safe_max_vram_gb: 23},
                                     {index: 1, total_vram_gb: 16, safe_max_vram_gb: 15}]}
switching: {host_ram_budget_gb: 12}
monitor: {footprints_path: null}
models:
  qwen-14b: {kind: llm, vram_gb: 11.5}
  sdxl-base: {kind: sdxl, vram_gb: 10.5, offload: true, host_gb: 6.5}
  big: {kind: llm, vram_gb: 26, tensor_parallel: 2}
  tts: {kind: tts, vram_gb: 3.5, gpus: [1]}
""",
    source="<property test: a workstation>",
)
TestWorkstation = machine_for(WORKSTATION).TestCase
TestWorkstation.settings = SETTINGS
