"""The config sections one model, the daemon and the disk cache are read from: checked and
parsed into their frozen specs (``orchestrator.spec``), with the checks every section shares
(each error names the file and the key). ``orchestrator.config_hardware`` reads the hardware's
cards with these checks; ``orchestrator.config``'s parser builds on both and reads the rest
(the hardware's device and index, switching, defaults, monitor, observability)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from types import MappingProxyType
from typing import Any

from orchestrator.backends.options import OptionError
from orchestrator.backends.registry import TYPES, parse_options
from orchestrator.errors import ConfigError
from orchestrator.spec import (
    BackendOptions,
    CacheSpec,
    CardSpec,
    DaemonSpec,
    ModelSpec,
    RequestLimits,
    SimSpec,
    card_share_bytes,
)
from states.machine import KIND_STATES
from states.units import format_gib, gib_to_bytes

KINDS = tuple(KIND_STATES)  # llm, sdxl, tts: one ACTIVE state each
DEVICES = ("auto", "nvml", "torch", "simulated")
FOREIGN_POLICIES = ("wait", "fail")
BACKENDS = tuple(TYPES)
CONFIDENCES = ("low", "medium", "high")
DEFAULT_CONFIG_NAME = "simulated-16gb.yaml"

# Simulated latencies per kind, in seconds: the Model Management Module's targets (stop LLM
# 5-8 s, start LLM 15-25 s, unload SDXL 2-3 s, load SDXL 5-8 s) and, for the host tier, what was
# measured on an H200, PCIe Gen5 (a pinned host copy of SDXL comes back in 0.13 s; an offload
# only frees the GPU copy).
SIM_LATENCY_S: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {
        "llm": {"load_s": 20.0, "unload_s": 6.0, "offload_s": 0.05, "restore_s": 0.5},
        "sdxl": {"load_s": 6.0, "unload_s": 2.5, "offload_s": 0.05, "restore_s": 0.13},
        "tts": {"load_s": 3.0, "unload_s": 1.0, "offload_s": 0.02, "restore_s": 0.05},
    }
)


def _typename(v: object) -> str:
    return "nothing" if v is None else type(v).__name__


class _Sections:
    """Parsing of a model, the daemon and the cache sections; the checks they share, which
    ``orchestrator.config_hardware`` reads the hardware's cards with."""

    source: str
    _device: str  # what the hardware section said (a model's checks depend on it)
    _total: int
    _gpu: str

    def err(self, key: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(self.source, key, problem, fix)

    def section(
        self, raw: Mapping[str, Any], key: str, allowed: tuple[str, ...], required: bool
    ) -> dict[str, Any]:
        v = raw.get(key)
        if v is None:
            if required:
                raise self.err(key, "missing section", f"add a `{key}:` mapping")
            return {}
        if not isinstance(v, Mapping):
            raise self.err(
                key, f"expected a mapping, got {_typename(v)}", f"write `{key}:` as key: value lines"
            )
        self.no_unknown(v, key, allowed)
        return dict(v)

    def no_unknown(self, v: Mapping[str, Any], where: str, allowed: tuple[str, ...]) -> None:
        for k in v:
            if k not in allowed:
                raise self.err(
                    f"{where}.{k}" if where else str(k),
                    "unknown key",
                    f"remove it or use one of: {', '.join(allowed)}",
                )

    def number(self, v: Any, key: str, *, minimum: float = 0.0, strict: bool = False) -> float:
        try:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)):
                raise ValueError
        except (ValueError, OverflowError):
            raise self.err(
                key, f"expected a finite number, got {v!r}", "write a number such as 11.5"
            ) from None
        if v < minimum or (strict and v == minimum):
            rel = "greater than" if strict else "at least"
            raise self.err(key, f"must be {rel} {minimum:g}, got {v!r}", "use a positive size in GiB")
        return float(v)

    def choice(self, v: Any, key: str, options: tuple[str, ...]) -> str:
        if v not in options:
            raise self.err(
                key, f"{v!r} is not one of {', '.join(options)}", f"use one of: {', '.join(options)}"
            )
        return str(v)

    def kinds(self, v: Any, key: str) -> frozenset[str]:
        if not isinstance(v, list):
            raise self.err(key, f"expected a list of kinds, got {v!r}", f"write e.g. [{', '.join(KINDS)}]")
        for k in v:
            self.choice(k, key, KINDS)
        return frozenset(v)

    def cache(self, raw: Mapping[str, Any]) -> CacheSpec | None:
        """``cache: {path: DIR, budget_gb: N, verify: true}``; absent or null: no cache."""
        if raw.get("cache") is None:
            return None
        c = self.section(raw, "cache", ("path", "budget_gb", "verify"), False)
        path = c.get("path", "default")
        if not isinstance(path, str) or not path:
            raise self.err(
                "cache.path",
                f"expected a folder path, got {path!r}",
                "write a folder such as ~/.cache/vram-orchestrator/checkpoints, or default",
            )
        if path == "default":
            from orchestrator.backends.diskcache import default_cache_dir

            path = str(default_cache_dir())
        if "budget_gb" not in c:
            raise self.err(
                "cache.budget_gb",
                "missing: how much disk the cache may use",
                "set it in GiB, e.g. budget_gb: 50 (each cached SDXL takes about 6.5)",
            )
        budget = self.number(c["budget_gb"], "cache.budget_gb", strict=True)
        verify = c.get("verify", True)
        if not isinstance(verify, bool):
            raise self.err(
                "cache.verify",
                f"expected true or false, got {verify!r}",
                "true checks each chunk's checksum while loading",
            )
        return CacheSpec(path=path, budget_bytes=gib_to_bytes(budget), verify=verify)

    def daemon(self, d: Mapping[str, Any]) -> DaemonSpec:
        host = d.get("host", "127.0.0.1")
        if not isinstance(host, str) or not host:
            raise self.err("daemon.host", f"expected a host name or address, got {host!r}", "e.g. 127.0.0.1")
        port = d.get("port", 8470)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise self.err("daemon.port", f"expected a port number 1-65535, got {port!r}", "e.g. 8470")
        token = d.get("token")
        if token is not None and (not isinstance(token, str) or len(token) < 8):
            raise self.err(
                "daemon.token",
                "expected a string of at least 8 characters",
                "generate one: python -c 'import secrets; print(secrets.token_urlsafe(24))'",
            )
        max_body = d.get("max_body_bytes", 1 << 20)
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1024:
            raise self.err(
                "daemon.max_body_bytes", f"expected an integer >= 1024, got {max_body!r}", "e.g. 1048576"
            )
        ttl = self.number(d.get("lease_ttl_s", 30.0), "daemon.lease_ttl_s", strict=True)
        max_ttl = self.number(d.get("max_lease_ttl_s", 3600.0), "daemon.max_lease_ttl_s", strict=True)
        if ttl > max_ttl:
            raise self.err(
                "daemon.lease_ttl_s",
                f"{ttl:g} s is longer than max_lease_ttl_s ({max_ttl:g} s)",
                "keep lease_ttl_s at or below max_lease_ttl_s",
            )
        return DaemonSpec(
            host=host,
            port=port,
            token=token,
            lease_ttl_s=ttl,
            max_lease_ttl_s=max_ttl,
            grace_s=self.number(d.get("grace_s", 10.0), "daemon.grace_s"),
            max_body_bytes=max_body,
            request_timeout_s=self.number(
                d.get("request_timeout_s", 600.0), "daemon.request_timeout_s", strict=True
            ),
        )

    MODEL_KEYS = (
        "kind", "vram_gb", "confidence", "backend", "offload", "host_gb", "simulation", "aliases",
        "max_concurrent", "limits", "gpus", "tensor_parallel",
    )  # fmt: skip
    LIMIT_KEYS = tuple(f.name for f in fields(RequestLimits))
    SIM_KEYS = ("load_s", "unload_s", "offload_s", "restore_s", "true_vram_gb", "use_peak_gb")

    # -- one model ---------------------------------------------------------------------------

    def model(
        self, name: str, m: Any, cards: tuple[CardSpec, ...], kinds: frozenset[str], time_scale: float
    ) -> ModelSpec:
        key = f"models.{name}"
        if not isinstance(m, Mapping):
            raise self.err(
                key, f"expected a mapping, got {_typename(m)}", "give it at least kind and vram_gb"
            )
        self.no_unknown(m, key, self.MODEL_KEYS)
        if "kind" not in m:
            raise self.err(f"{key}.kind", "missing", f"set kind to one of: {', '.join(KINDS)}")
        kind = self.choice(m["kind"], f"{key}.kind", KINDS)
        if kind not in kinds:
            raise self.err(
                f"{key}.kind",
                f"kind {kind!r} is neither in switching.heavy_models nor light_models",
                "list the kind in one of them",
            )
        if "vram_gb" not in m:
            raise self.err(
                f"{key}.vram_gb", "missing", "set the model's VRAM estimate in GiB, e.g. vram_gb: 11.5"
            )
        vram = gib_to_bytes(self.number(m["vram_gb"], f"{key}.vram_gb", strict=True))
        gpus, tp = self.placement(m, key, cards)
        usable = [c for c in cards if gpus is None or c.index in gpus]
        share = card_share_bytes(vram, tp)
        fit = [c for c in usable if c.budget_bytes >= share]
        if len(fit) < tp:
            largest = max(c.budget_bytes for c in usable)
            if tp > 1:
                raise self.err(
                    f"{key}.tensor_parallel",
                    f"its share of {format_gib(share)} per card fits {len(fit)} of the "
                    f"{len(usable)} cards it may use, and it spans {tp}",
                    "lower tensor_parallel, allow more cards in gpus, or raise their safe_max_vram_gb",
                )
            whole = "the whole budget" if len(cards) == 1 else "every card's budget it may use"
            raise self.err(
                f"{key}.vram_gb",
                f"{format_gib(vram)} is larger than {whole} "
                f"({format_gib(largest)}; short {format_gib(vram - largest)})",
                "use a smaller variant or raise hardware.safe_max_vram_gb"
                + ("" if len(cards) == 1 else ", or span cards with tensor_parallel"),
            )
        confidence = self.choice(m.get("confidence", "medium"), f"{key}.confidence", CONFIDENCES)
        b = m.get("backend", "simulated")
        options: dict[str, Any] = {}
        if isinstance(b, Mapping):
            options = {str(k): v for k, v in b.items() if k != "type"}
            b = b.get("type")
        backend = self.choice(b, f"{key}.backend" + (".type" if options else ""), BACKENDS)
        try:
            parsed = parse_options(backend, options)
        except OptionError as exc:
            raise self.err(f"{key}.backend.{exc.key}", exc.problem, self.backend_fix(backend)) from None
        offload = m.get("offload", False)
        if not isinstance(offload, bool):
            raise self.err(
                f"{key}.offload",
                f"expected true or false, got {offload!r}",
                "true keeps a host-RAM copy on eviction",
            )
        host = gib_to_bytes(self.number(m["host_gb"], f"{key}.host_gb")) if "host_gb" in m else vram
        s = {} if m.get("simulation") is None else m["simulation"]
        if not isinstance(s, Mapping):
            raise self.err(
                f"{key}.simulation", f"expected a mapping, got {_typename(s)}", "e.g. {load_s: 20}"
            )
        self.no_unknown(s, f"{key}.simulation", self.SIM_KEYS)
        lat = SIM_LATENCY_S[kind]
        sim = SimSpec(
            **{k: self.number(s.get(k, lat[k]), f"{key}.simulation.{k}") for k in lat},
            true_vram_bytes=gib_to_bytes(
                self.number(s["true_vram_gb"], f"{key}.simulation.true_vram_gb", strict=True)
            )
            if "true_vram_gb" in s
            else vram,
            use_peak_bytes=gib_to_bytes(
                self.number(s.get("use_peak_gb", 0), f"{key}.simulation.use_peak_gb")
            ),
        )
        aliases = m.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            raise self.err(
                f"{key}.aliases", f"expected a list of names, got {aliases!r}", "e.g. [sdxl-controlnet]"
            )
        limits = self.limits(m.get("limits"), f"{key}.limits")
        clash = parsed.limit_problem(limits)
        if clash is not None:
            raise self.err(f"{key}.backend.{clash[0]}", clash[1], clash[2])
        return ModelSpec(
            name=name,
            kind=kind,
            vram_bytes=vram,
            confidence=confidence,
            backend=backend,
            options=parsed,
            offload=offload,
            host_bytes=host,
            sim=sim,
            aliases=tuple(aliases),
            max_concurrent=self.max_concurrent(m, key, parsed),
            limits=limits,
            gpus=gpus,
            tensor_parallel=tp,
        )

    def placement(
        self, m: Mapping[str, Any], key: str, cards: tuple[CardSpec, ...]
    ) -> tuple[tuple[int, ...] | None, int]:
        """``gpus`` (the cards a model may use) and ``tensor_parallel`` (how many it spans)."""
        indexes = [c.index for c in cards]
        gpus = m.get("gpus")
        if gpus is not None:
            if (
                not isinstance(gpus, list)
                or not gpus
                or not all(isinstance(g, int) and not isinstance(g, bool) for g in gpus)
            ):
                raise self.err(
                    f"{key}.gpus", f"expected a list of card indexes, got {gpus!r}", "e.g. gpus: [1]"
                )
            unknown = [g for g in gpus if g not in indexes]
            if unknown:
                raise self.err(
                    f"{key}.gpus",
                    f"names {unknown}, which hardware does not list (its cards: {indexes})",
                    "name cards listed in hardware.gpus",
                )
            if len(set(gpus)) != len(gpus):
                raise self.err(f"{key}.gpus", f"lists a card twice: {gpus}", "list each card once")
        tp = self.whole(m.get("tensor_parallel", 1), f"{key}.tensor_parallel", nullable=False,
                        fix="the number of cards it spans, e.g. tensor_parallel: 2")  # fmt: skip
        assert tp is not None
        allowed = len(gpus) if gpus is not None else len(cards)
        if tp > allowed:
            raise self.err(
                f"{key}.tensor_parallel",
                f"spans {tp} cards and may use {allowed}",
                "lower tensor_parallel, or list more cards (hardware.gpus, models.<name>.gpus)",
            )
        return (tuple(gpus) if gpus is not None else None), tp

    def whole(self, v: Any, key: str, *, nullable: bool, fix: str) -> int | None:
        """A whole number >= 1 (or null where ``nullable``)."""
        if v is None and nullable:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            want = "a whole number >= 1" + (" or null" if nullable else "")
            raise self.err(key, f"expected {want}, got {v!r}", fix)
        return int(v)

    @staticmethod
    def backend_fix(backend: str) -> str:
        return f"see the {'server' if backend == 'vllm' else backend} backend's keys in the README"

    def max_concurrent(self, m: Mapping[str, Any], key: str, options: BackendOptions) -> int | None:
        if "max_concurrent" in m:
            return self.whole(
                m["max_concurrent"],
                f"{key}.max_concurrent",
                nullable=True,
                fix="e.g. max_concurrent: 1 for one request at a time; null: no limit",
            )
        return options.default_max_concurrent(
            device=self._device, total_bytes=self._total, gpu_name=self._gpu
        )

    def limits(self, v: Any, key: str) -> RequestLimits:
        if v is None:
            return RequestLimits()
        if not isinstance(v, Mapping):
            raise self.err(key, f"expected a mapping, got {_typename(v)}", "e.g. {max_steps: 50, max_n: 4}")
        self.no_unknown(v, key, self.LIMIT_KEYS)
        defaults = RequestLimits()
        values: dict[str, int | None] = {}
        for k in self.LIMIT_KEYS:
            if k in v:
                values[k] = self.whole(
                    v[k], f"{key}.{k}", nullable=k == "max_tokens",
                    fix=(
                        "write a whole number of at least 1, or null for the server's own cap"
                        if k == "max_tokens"
                        else f"write a whole number of at least 1 (the default is {getattr(defaults, k)})"
                    ),
                )  # fmt: skip
        return RequestLimits(**values)  # type: ignore[arg-type]
