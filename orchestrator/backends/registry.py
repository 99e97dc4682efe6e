"""Backend types by name: ``backend: {type: NAME}`` -> its option parser and its factory.

Each backend module ends with ``BACKEND = BackendType(parse=..., create=...)``; ``TYPES`` names
the module of each type, imported only when a config uses it (so importing this registry, or
reading a config of simulated models, imports no torch, diffusers or transformers). Adding a
backend type: write its module (options, backend, ``create``, ``BACKEND``) and add its line to
``TYPES``.

The config parser calls ``parse_options`` once per model, when the config is read; the
runtime calls ``create_backend`` once per model, when the orchestrator is built.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.backends.base import Backend, BackendType
from orchestrator.spec import BackendOptions, Config, ModelSpec

if TYPE_CHECKING:
    from orchestrator.device.base import Device

__all__ = ["TYPES", "backend_type", "create_backend", "parse_options"]

TYPES: Mapping[str, str] = {
    "simulated": "orchestrator.backends.simulated",
    "synthetic": "orchestrator.backends.synthetic",
    "server": "orchestrator.backends.server",
    "vllm": "orchestrator.backends.vllm",
    "diffusers": "orchestrator.backends.diffusers",
    "tts": "orchestrator.backends.tts",
    "ollama": "orchestrator.backends.ollama",
    "llamacpp_router": "orchestrator.backends.llamacpp",
    "comfyui": "orchestrator.backends.comfyui",
    "sglang": "orchestrator.backends.sglang",
    "lmstudio": "orchestrator.backends.lmstudio",
}


def backend_type(name: str) -> BackendType:
    """The registered type ``name`` (a ``KeyError`` naming the known ones otherwise)."""
    if name not in TYPES:
        raise KeyError(f"unknown backend type {name!r}; the types are: {', '.join(TYPES)}")
    found = importlib.import_module(TYPES[name]).BACKEND
    assert isinstance(found, BackendType), f"{TYPES[name]}.BACKEND is not a BackendType"
    return found


def parse_options(name: str, raw: Mapping[str, Any]) -> BackendOptions:
    """The frozen options of backend type ``name`` from its ``backend:`` mapping (less
    ``type``); an ``OptionError`` names a bad key."""
    return backend_type(name).parse(raw)


def create_backend(spec: ModelSpec, *, config: Config, device: Device, log_dir: Path) -> Backend:
    """The backend of one model. A ``ConfigError`` when its type cannot run on ``device``
    (synthetic on the simulated device, simulated on a real one).

    A spec built in code with its options still a raw mapping has them parsed here.
    """
    options: object = spec.options
    if isinstance(options, Mapping):
        spec = dataclasses.replace(spec, options=parse_options(spec.backend, options))
    return backend_type(spec.backend).create(spec, config=config, device=device, log_dir=log_dir)
