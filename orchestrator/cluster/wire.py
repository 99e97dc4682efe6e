"""Errors across machines: an orchestrator's error on one machine raised, as the same class
with the same message and facts, in the process that asked for the lease.

Ray would pickle the exception itself, but an error whose ``__init__`` takes its facts
(``AcquireTimeout(model, timeout_s, ...)``) cannot be rebuilt from its message alone; so the
actor sends (module, class, message, plain attributes) and ``from_wire`` rebuilds it without
calling ``__init__``. Only this project's classes are rebuilt; any other error arrives as a
``ClusterError`` that names it.
"""

from __future__ import annotations

import importlib
from typing import Any

from orchestrator.errors import OrchestratorError

_PLAIN = (str, int, float, bool, type(None))
_OURS = ("orchestrator.", "states.")


class ClusterError(OrchestratorError):
    """An error on a machine of the cluster that is not one of this project's own."""


def to_wire(exc: BaseException) -> dict[str, Any]:
    attrs = {k: v for k, v in vars(exc).items() if _plain(v)}
    return {
        "module": type(exc).__module__,
        "name": type(exc).__qualname__,
        "message": str(exc),
        "attrs": attrs,
    }


def _plain(v: object) -> bool:
    if isinstance(v, _PLAIN):
        return True
    if isinstance(v, (list, tuple, frozenset)):
        return all(isinstance(x, _PLAIN) for x in v)
    return False


def _bare(cls: type[Exception]) -> Exception:
    """An instance of ``cls`` without its ``__init__``: made by the ``__new__`` of the first
    built-in base whose layout it has (an error that is also a ``TimeoutError`` has
    ``OSError``'s, not ``RuntimeError``'s)."""
    for base in cls.__mro__:
        if base.__module__ == "builtins" and issubclass(base, BaseException):
            try:
                made: Exception = base.__new__(cls)
                return made
            except TypeError:
                continue
    raise TypeError(f"cannot rebuild {cls.__qualname__}")


def from_wire(d: dict[str, Any], *, node: str) -> BaseException:
    """The error ``to_wire`` sent from machine ``node``, rebuilt."""
    module, name, message = str(d["module"]), str(d["name"]), str(d["message"])
    cls: Any = None
    if module.startswith(_OURS):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return ClusterError(f"machine {node}: {name}: {message}")
    exc = _bare(cls)
    exc.args = (message,)
    for k, v in dict(d.get("attrs") or {}).items():
        try:
            setattr(exc, k, v)
        except AttributeError:
            pass
    return exc
