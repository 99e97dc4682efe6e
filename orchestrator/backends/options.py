"""Parsing a model's ``backend:`` mapping: the error every option parser raises, and the
checks several backend types share.

A parser (one per backend type, named by its registry entry) turns the raw mapping into its
frozen options object, or raises ``OptionError`` naming the key; the config parser turns that
into a ``ConfigError`` with the file and the model (``models.<name>.backend.<key>``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.spec import BackendOptions, ModelSpec

OptionsT = TypeVar("OptionsT", bound=BackendOptions)

DTYPES = ("auto", "float16", "bfloat16", "float32")


class OptionError(ValueError):
    """A bad key or value in a ``backend:`` mapping: which key, and what is wrong with it."""

    def __init__(self, key: str, problem: str) -> None:
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}")


def no_unknown(opts: Mapping[str, Any], allowed: tuple[str, ...] | frozenset[str]) -> None:
    unknown = sorted(str(k) for k in opts if k not in allowed)
    if unknown:
        raise OptionError(unknown[0], f"unknown key; use one of: {', '.join(sorted(allowed))}")


def path_option(opts: Mapping[str, Any], key: str = "path", *, required: bool = True) -> Path | None:
    """A local path (``~`` expanded); None when absent and not required."""
    value = opts.get(key)
    if value is None:
        if required:
            raise OptionError(key, "missing: give the local folder of the model")
        return None
    if not isinstance(value, str) or not value:
        raise OptionError(key, f"expected a local path, got {value!r}")
    return Path(value).expanduser()


def dtype_option(opts: Mapping[str, Any]) -> str:
    dtype = opts.get("dtype", "auto")
    if dtype not in DTYPES:
        raise OptionError("dtype", f"expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return str(dtype)


def positive_seconds(opts: Mapping[str, Any], key: str, default: float) -> float:
    v = opts.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
        raise OptionError(key, f"expected a positive number of seconds, got {v!r}")
    return float(v)


def parse_no_options(opts: Mapping[str, Any]) -> BackendOptions:
    """The parser of a backend type that takes no options (only ``type``)."""
    for k in opts:
        raise OptionError(str(k), "unknown key; this backend type takes no options besides type")
    return BackendOptions()


def options_of(spec: ModelSpec, cls: type[OptionsT]) -> OptionsT:
    """``spec.options``, which must be ``cls`` (parsed, as the config parser leaves them)."""
    if not isinstance(spec.options, cls):
        raise TypeError(
            f"model {spec.name!r} (backend {spec.backend}) needs {cls.__name__}, got "
            f"{type(spec.options).__name__}: parse its options with "
            "orchestrator.backends.registry.parse_options"
        )
    return spec.options
