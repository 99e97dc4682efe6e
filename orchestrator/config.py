"""Config: YAML parsed once, at the edge, into frozen validated objects.

The objects themselves live in ``orchestrator.spec`` (re-exported here); this module reads
and checks. Sizes are written in GiB (``vram_gb``: binary gigabytes, as nvidia-smi's MiB are
binary) and kept in bytes. Every error names the file, the key, the bad value and the fix.
A model's ``backend:`` mapping is parsed by its type's parser (``orchestrator.backends.
registry``) into that type's frozen options.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from orchestrator.config_hardware import hardware_cards, hardware_sizes
from orchestrator.config_sections import (
    BACKENDS,
    DEFAULT_CONFIG_NAME,
    DEVICES,
    FOREIGN_POLICIES,
    KINDS,
    _Sections,
    _typename,
)
from orchestrator.errors import ConfigError
from orchestrator.spec import CardSpec, Config, DaemonSpec, ModelSpec, RequestLimits, SimSpec
from states.scheduling import Mode
from states.units import gib_to_bytes

__all__ = [
    "BACKENDS",
    "CONFIG_ENV",
    "Config",
    "DaemonSpec",
    "ModelSpec",
    "RequestLimits",
    "SimSpec",
    "load_config",
    "parse_config",
]

# -- loading -----------------------------------------------------------------------------------


CONFIG_ENV = "VRAM_ORCHESTRATOR_CONFIG"


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate a YAML config.

    ``None`` means the file named by the ``VRAM_ORCHESTRATOR_CONFIG`` environment variable when
    it is set (so the Model Management Module's ``ModelManager()`` and ``ServiceController()``
    find a machine's config with no code change), else the embedded default.
    """
    if path is None and os.environ.get(CONFIG_ENV):
        path = os.environ[CONFIG_ENV]
    if path is None:
        text = resources.files("orchestrator").joinpath("defaults", DEFAULT_CONFIG_NAME).read_text()
        return parse_config(text, source=f"<embedded {DEFAULT_CONFIG_NAME}>")
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(
            str(p), "", "file not found", "check the path (a relative one starts in the current folder)"
        ) from None
    except OSError as exc:
        raise ConfigError(str(p), "", f"cannot read it ({exc.strerror})", "check its permissions") from None
    return parse_config(text, source=str(p))


def parse_config(text: str, source: str = "<string>") -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, where, f"malformed YAML ({problem})", "fix the YAML syntax there") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(
            source,
            "",
            f"expected a mapping at the top, got {_typename(raw)}",
            "start from configs/simulated-16gb.yaml",
        )
    return _Parser(source).config(raw)


class _Parser(_Sections):
    TOP = (
        "hardware", "switching", "models", "defaults", "simulation", "observability", "monitor", "daemon",
        "cache",
    )  # fmt: skip
    DAEMON_KEYS = (
        "host", "port", "token", "lease_ttl_s", "max_lease_ttl_s", "grace_s", "max_body_bytes",
        "request_timeout_s",
    )  # fmt: skip

    def __init__(self, source: str) -> None:
        self.source = source
        self._device, self._total, self._gpu = "auto", 0, "GPU"

    def config(self, raw: Mapping[str, Any]) -> Config:
        self.no_unknown(raw, "", self.TOP)
        hw = self.section(
            raw,
            "hardware",
            ("gpu_name", "device", "index", "total_vram_gb", "safe_max_vram_gb", "gpus"),
            True,
        )
        sw = self.section(
            raw,
            "switching",
            (
                "heavy_models",
                "light_models",
                "scheduling",
                "fairness",
                "fairness_s",
                "max_wait_s",
                "load_timeout_s",
                "unload_timeout_s",
                "retry_backoff_s",
                "host_ram_budget_gb",
                "foreign_memory",
            ),
            False,
        )
        sim = self.section(raw, "simulation", ("time_scale",), False)
        mon = self.section(
            raw, "monitor", ("learn_footprints", "footprints_path", "footprint_margin", "sample_hz"), False
        )
        learn = mon.get("learn_footprints", True)
        if not isinstance(learn, bool):
            raise self.err(
                "monitor.learn_footprints",
                f"expected true or false, got {learn!r}",
                "true plans with what models really took",
            )
        footprints_path = mon.get("footprints_path", "default")
        if footprints_path is not None and (not isinstance(footprints_path, str) or not footprints_path):
            raise self.err(
                "monitor.footprints_path",
                f"expected a file path or null, got {footprints_path!r}",
                "null keeps learned footprints in memory only",
            )
        obs = self.section(raw, "observability", ("events_path",), False)
        events_path = obs.get("events_path")
        if events_path is not None and (not isinstance(events_path, str) or not events_path):
            raise self.err(
                "observability.events_path",
                f"expected a file path, got {events_path!r}",
                "write a path such as ~/.cache/vram-orchestrator/events.jsonl, or remove the key",
            )
        models_raw = raw.get("models")
        if not isinstance(models_raw, Mapping) or not models_raw:
            raise self.err(
                "models",
                f"expected a mapping of model names, got {_typename(models_raw)}",
                "add at least one model under `models:` with kind and vram_gb",
            )

        device = self.choice(hw.get("device", "auto"), "hardware.device", DEVICES)
        cards = hardware_cards(self, hw, device)
        if cards is not None:
            budget = sum(c.budget_bytes for c in cards)
            total = sum(c.total_bytes for c in cards)
            index = cards[0].index
        else:
            budget, total = hardware_sizes(self, hw, "hardware")
            index = hw.get("index", 0)
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise self.err(
                    "hardware.index", f"expected a GPU index >= 0, got {index!r}", "use 0 for the first GPU"
                )

        heavy = self.kinds(sw.get("heavy_models", ["llm", "sdxl"]), "switching.heavy_models")
        light = self.kinds(sw.get("light_models", ["tts"]), "switching.light_models")
        if heavy & light:
            raise self.err(
                "switching.light_models",
                f"{sorted(heavy & light)} listed as both heavy and light",
                "list each kind once",
            )
        time_scale = self.number(sim.get("time_scale", 1.0), "simulation.time_scale")

        self._device, self._total, self._gpu = device, total, str(hw.get("gpu_name", "GPU"))
        models = {}
        one = CardSpec(index, self._gpu, total, budget)
        for name, m in models_raw.items():
            models[str(name)] = self.model(str(name), m, cards or (one,), heavy | light, time_scale)

        defaults_raw = {} if raw.get("defaults") is None else raw["defaults"]
        if not isinstance(defaults_raw, Mapping):
            raise self.err(
                "defaults",
                f"expected a mapping kind: model, got {_typename(defaults_raw)}",
                "write e.g. `llm: qwen-14b`",
            )
        defaults: dict[str, str] = {}
        for kind, model in defaults_raw.items():
            self.choice(kind, f"defaults.{kind}", KINDS)
            if not isinstance(model, str) or model not in models:
                raise self.err(
                    f"defaults.{kind}",
                    f"{model!r} names no configured model",
                    f"use one of: {', '.join(models)}",
                )
            if models[model].kind != kind:
                raise self.err(
                    f"defaults.{kind}",
                    f"{model!r} is of kind {models[model].kind!r}, not {kind!r}",
                    f"name a model of kind {kind!r}",
                )
            defaults[str(kind)] = str(model)
        for kind in KINDS:  # a kind with exactly one model defaults to it
            of_kind = [n for n, s in models.items() if s.kind == kind]
            if kind not in defaults and len(of_kind) == 1:
                defaults[kind] = of_kind[0]

        def secs(key: str, default: float) -> float:
            return self.number(sw.get(key, default), f"switching.{key}", strict=True)

        fairness_s = self.number(sw.get("fairness_s", 5.0), "switching.fairness_s")
        # A config that sets only fairness_s keeps its meaning: the time rule.
        rule = sw.get("fairness", "time" if "fairness_s" in sw else "cost")
        fairness = self.choice(rule, "switching.fairness", ("cost", "time"))
        max_wait_s = secs("max_wait_s", 300.0)
        if fairness_s > max_wait_s:
            raise self.err(
                "switching.fairness_s",
                f"{fairness_s:g} s is longer than max_wait_s ({max_wait_s:g} s)",
                "keep fairness_s at or below max_wait_s",
            )
        return Config(
            source=self.source,
            gpu_name=cards[0].name if cards else str(hw.get("gpu_name", "GPU")),
            device=device,
            device_index=index,
            total_bytes=total,
            budget_bytes=budget,
            exclusive_kinds=heavy,
            light_kinds=light,
            models=MappingProxyType(models),
            defaults=MappingProxyType(defaults),
            mode=Mode(
                self.choice(
                    sw.get("scheduling", "fair"), "switching.scheduling", tuple(m.value for m in Mode)
                )
            ),
            fairness=fairness,
            fairness_s=fairness_s,
            max_wait_s=max_wait_s,
            load_timeout_s=secs("load_timeout_s", 300.0),
            unload_timeout_s=secs("unload_timeout_s", 60.0),
            retry_backoff_s=self.number(sw.get("retry_backoff_s", 2.0), "switching.retry_backoff_s"),
            host_budget_bytes=gib_to_bytes(
                self.number(sw.get("host_ram_budget_gb", 0), "switching.host_ram_budget_gb")
            ),
            time_scale=time_scale,
            events_path=events_path,
            foreign_memory=self.choice(
                sw.get("foreign_memory", "wait"), "switching.foreign_memory", FOREIGN_POLICIES
            ),
            learn_footprints=learn,
            # "default": the user's cache directory on a real device; in memory on the
            # simulated one (simulated figures must not mix with real ones).
            footprints_path=(None if device == "simulated" else "default")
            if footprints_path == "default"
            else footprints_path,
            footprint_margin=self.number(mon.get("footprint_margin", 0.05), "monitor.footprint_margin"),
            sample_hz=self.number(mon.get("sample_hz", 20.0), "monitor.sample_hz"),
            daemon=self.daemon(self.section(raw, "daemon", self.DAEMON_KEYS, False)),
            cache=self.cache(raw),
            gpus=cards if cards is not None and len(cards) > 1 else (),
        )
