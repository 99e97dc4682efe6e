"""The demo's configs: the tiny real models in place of the simulated SDXL and TTS, several
simulated cards (``demo --gpus N``), and the real GPU when it has the room."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any, TextIO

from orchestrator.backends.registry import parse_options
from orchestrator.config import Config
from orchestrator.errors import OrchestratorError
from orchestrator.footprints import default_path
from orchestrator.progress import StatusLine, Ticker
from orchestrator.spec import CardSpec
from orchestrator.tiny_models import build as build_tiny
from states.units import format_gib

TINY_HINT = (
    "pip install torch==2.13.0 && pip install 'vram-orchestrator[diffusers]' for a real image "
    "and waveform from tiny local models"
)


def tiny_models_missing() -> str | None:
    """Why the tiny real models cannot run here (None when they can)."""
    import importlib.util

    for module in ("torch", "transformers", "diffusers", "peft", "PIL"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


def default_tiny_dir() -> Path:
    return default_path().parent / "tiny-models"


def tiny_targets(config: Config) -> dict[str, str]:
    """The config's default SDXL and TTS models that the tiny models would replace (kind ->
    name): those that are simulated or synthetic. Models with a real backend stay."""
    return {
        kind: config.defaults[kind]
        for kind in ("sdxl", "tts")
        if kind in config.defaults
        and config.models[config.defaults[kind]].backend in ("simulated", "synthetic")
    }


def with_tiny_models(config: Config, root: Path, *, stream: TextIO | None = None) -> tuple[Config, list[str]]:
    """The config with its simulated (or synthetic) SDXL and TTS defaults replaced by the real
    tiny models (built under ``root`` on first use). On the simulated device they run on the
    CPU and their configured sizes stand for them in VRAM; on a real one they run on the GPU.
    Returns the new config and the models replaced.

    :param stream: where a terminal shows the build's progress (first use: about 15 s).
    """
    wanted = {"sdxl": "tiny-sdxl", "tts": "tiny-tts"}
    targets = tiny_targets(config)
    if not targets:
        return config, []
    from orchestrator.backends.inprocess_options import quiet_imports

    with Ticker(StatusLine(stream or sys.stdout)) as ticker:
        paths = build_tiny(root, tuple(wanted[k] for k in targets), progress=ticker.step)
        # Import the libraries now, so their import time (seconds) is not counted as a switch.
        ticker.step("importing diffusers and transformers")
        with quiet_imports():
            import diffusers
            import transformers

            diffusers.StableDiffusionXLPipeline, transformers.VitsModel  # noqa: B018 - lazy modules
    models = dict(config.models)
    for kind, name in targets.items():
        options: dict[str, Any] = {"path": str(paths[wanted[kind]])}
        if kind == "sdxl":
            options["steps"] = 4
        backend = "diffusers" if kind == "sdxl" else "tts"
        models[name] = dataclasses.replace(
            models[name], backend=backend, options=parse_options(backend, options), max_concurrent=1
        )
    return dataclasses.replace(config, models=MappingProxyType(models)), list(targets.values())


def with_cards(config: Config, n: int) -> Config:
    """The config on ``n`` simulated cards, each the size of its one card (``--gpus N``): what
    ``hardware.gpus: N`` gives. Its models may use any card."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if config.device != "simulated":
        raise OrchestratorError(
            f"--gpus {n} runs on the simulated device, and {config.source} has device "
            f"{config.device!r}: list your cards in its hardware.gpus instead"
        )
    if len(config.cards) > 1:
        raise OrchestratorError(
            f"{config.source} already lists {len(config.cards)} cards (hardware.gpus): drop --gpus"
        )
    if n == 1:
        return config
    (card,) = config.cards
    cards = tuple(CardSpec(i, card.name, card.total_bytes, card.budget_bytes) for i in range(n))
    models = {name: dataclasses.replace(spec, gpus=None) for name, spec in config.models.items()}
    return dataclasses.replace(
        config,
        gpus=cards,
        device_index=0,
        budget_bytes=n * card.budget_bytes,
        total_bytes=n * card.total_bytes,
        models=MappingProxyType(models),
    )


def real_gpu_variant(config: Config) -> tuple[Config | None, str]:
    """The embedded demo on this machine's GPU, when it has one with room for the budget.

    The same models and budget on the real device (NVML, or torch): the LLMs (and the
    variants the workflow does not use) are ``synthetic`` (real CUDA memory of their size,
    really allocated and freed at each switch); the default SDXL and TTS become the real tiny
    models (``with_tiny_models``) when their libraries are installed, synthetic otherwise.
    Returns ``(None, why)`` when there is no usable GPU.
    """
    if config.device != "simulated":
        return config, ""
    from orchestrator.device import DeviceUnavailable, open_real_device

    try:
        device = open_real_device(config.device_index)
    except DeviceUnavailable as exc:
        return None, str(exc)
    try:
        reading = device.read()
        name = device.name
    finally:
        close = getattr(device, "close", None)
        if close is not None:
            close()
    if reading.free_bytes < config.budget_bytes:
        return None, (
            f"{name} has {format_gib(reading.free_bytes)} free, the demo's budget is "
            f"{format_gib(config.budget_bytes)}"
        )
    models = {
        name_: dataclasses.replace(spec, backend="synthetic", options=parse_options("synthetic", {}))
        for name_, spec in config.models.items()
    }
    variant = dataclasses.replace(
        config,
        device="auto",
        gpu_name=f"{name} (a {format_gib(config.total_bytes)} slice)",
        models=MappingProxyType(models),
        footprints_path=None,  # the demo's figures must not mix with the user's own
    )
    return variant, ""
