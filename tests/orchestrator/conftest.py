"""Fixtures for the orchestrator's async tests: small configs that run in milliseconds.

The models and sizes are the Model Management Module's (a 16 GiB card with a 15.5 GiB budget;
qwen-14b 11.5 GiB, sdxl-base 10.5 GiB, gpt-sovits-small 3.5 GiB); the simulated latencies
are scaled by ``time_scale`` = 0.001, so an LLM load (20 s) takes 20 ms.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import yaml

from orchestrator.config import Config, parse_config
from orchestrator.device.simulated import SimulatedDevice
from orchestrator.runtime import Orchestrator

TIME_SCALE = 0.001

SWITCHING: dict[str, Any] = {
    "heavy_models": ["llm", "sdxl"],
    "light_models": ["tts"],
    "scheduling": "fair",
    "fairness_s": 0.05,
    "max_wait_s": 5.0,
    "load_timeout_s": 0.5,
    "unload_timeout_s": 0.2,
    "retry_backoff_s": 0.05,
    "host_ram_budget_gb": 24.0,
}

MODELS_YAML = """\
qwen-14b: {kind: llm, vram_gb: 11.5}
qwen-vl-7b: {kind: llm, vram_gb: 13.8}
sdxl-base: {kind: sdxl, vram_gb: 10.5, offload: true, host_gb: 6.5}
sdxl-lora: {kind: sdxl, vram_gb: 11.5, offload: true, host_gb: 6.7}
gpt-sovits-small: {kind: tts, vram_gb: 3.5}
"""

DEFAULTS_YAML = """\
llm: qwen-14b
sdxl: sdxl-base
"""


def config_yaml(models: str = MODELS_YAML, defaults: str | None = DEFAULTS_YAML, **switching: Any) -> str:
    """A config as YAML text: the 16 GiB card, small timeouts, ``switching`` overrides."""
    sw = {**SWITCHING, **switching}
    text = textwrap.dedent(
        f"""\
        hardware:
          gpu_name: test GPU
          device: simulated
          total_vram_gb: 16.0
          safe_max_vram_gb: 15.5
        simulation:
          time_scale: {TIME_SCALE}
        """
    )
    text += yaml.safe_dump({"switching": sw}, sort_keys=False)
    text += "models:\n" + textwrap.indent(textwrap.dedent(models), "  ")
    if defaults is not None:
        text += "defaults:\n" + textwrap.indent(textwrap.dedent(defaults), "  ")
    return text


def build_config(models: str = MODELS_YAML, defaults: str | None = DEFAULTS_YAML, **switching: Any) -> Config:
    return parse_config(config_yaml(models, defaults, **switching), source="<test config>")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def make_config() -> Callable[..., Config]:
    """``make_config(fairness_s=1.0)``: the test config with some switching keys changed."""
    return build_config


@pytest.fixture
def config() -> Config:
    return build_config()


@pytest.fixture
def make_orch() -> Callable[..., Orchestrator]:
    """``make_orch(**switching)``: an orchestrator (not yet entered) on the test config."""

    def make(config: Config | None = None, **switching: Any) -> Orchestrator:
        return Orchestrator(config if config is not None else build_config(**switching))

    return make


@pytest.fixture
def orch(make_orch: Callable[..., Orchestrator]) -> Orchestrator:
    return make_orch()


def device_of(orch: Orchestrator) -> SimulatedDevice:
    assert isinstance(orch.device, SimulatedDevice)
    return orch.device


async def wait_until(predicate: Callable[[], bool], within: float = 2.0, what: str = "") -> None:
    """Poll ``predicate`` every millisecond; fail the test after ``within`` seconds."""
    deadline = anyio.current_time() + within
    while anyio.current_time() < deadline:
        if predicate():
            return
        await anyio.sleep(0.001)
    if not predicate():
        pytest.fail(f"not true within {within} s: {what or predicate}")
