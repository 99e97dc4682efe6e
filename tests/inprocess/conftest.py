"""Fixtures for the in-process backends: the tiny models, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the in-process backends need torch (pip install torch==2.13.0)")
pytest.importorskip("transformers", reason="the in-process backends need transformers")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny SDXL (with LoRA and ControlNet) and TTS models, built here (about 10 s)."""
    pytest.importorskip(
        "diffusers", reason="the diffusers backend needs diffusers (pip install '.[diffusers]')"
    )
    pytest.importorskip("peft", reason="the tiny LoRA needs peft (pip install '.[diffusers]')")
    from orchestrator.tiny_models import build

    return build(
        tmp_path_factory.mktemp("tiny-models"), ("tiny-sdxl", "tiny-sdxl-lora", "tiny-controlnet", "tiny-tts")
    )


def config_text(
    tiny: dict[str, Path], *, host_gb: float = 12.0, extra_models: str = "", unload_timeout_s: float = 10
) -> str:
    """The Model Management Module's card with the tiny models standing in for SDXL and TTS."""
    sdxl, lora, cn, tts = (tiny[k] for k in ("tiny-sdxl", "tiny-sdxl-lora", "tiny-controlnet", "tiny-tts"))
    return f"""\
hardware: {{device: simulated, total_vram_gb: 16.0, safe_max_vram_gb: 15.5}}
switching:
  heavy_models: [llm, sdxl]
  light_models: [tts]
  host_ram_budget_gb: {host_gb}
  load_timeout_s: 60
  unload_timeout_s: {unload_timeout_s}
  retry_backoff_s: 0.01
simulation: {{time_scale: 0.001}}
models:
  qwen-14b: {{kind: llm, vram_gb: 11.5}}
  sdxl-base:
    kind: sdxl
    vram_gb: 10.5
    offload: true
    host_gb: 6.5
    backend: {{type: diffusers, path: "{sdxl}", steps: 2}}
  sdxl-lora:
    kind: sdxl
    vram_gb: 11.5
    offload: true
    host_gb: 6.7
    backend: {{type: diffusers, path: "{sdxl}", lora: "{lora}", steps: 2}}
  sdxl-lora-controlnet:
    kind: sdxl
    vram_gb: 14.5
    backend: {{type: diffusers, pipeline: sdxl, path: "{sdxl}", lora: "{lora}", controlnet: "{cn}", steps: 2}}
  tts-small:
    kind: tts
    vram_gb: 3.5
    offload: true
    host_gb: 1.5
    backend: {{type: tts, path: "{tts}"}}
{extra_models}defaults: {{llm: qwen-14b, sdxl: sdxl-base, tts: tts-small}}
"""
