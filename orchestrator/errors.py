"""Errors of the orchestrator.

The hierarchy::

    RuntimeError
     └── OrchestratorError                 (states.errors) every error of this project
          ├── IllegalTransition            (states.errors) a trigger the machine forbids now
          ├── InsufficientVRAM             (states.errors) a model cannot fit
          ├── ConfigError (also ValueError) a config file is wrong: file, key, value, fix
          ├── UnknownModel (also LookupError) a name that is neither a model nor a kind
          ├── AcquireTimeout (also TimeoutError) a lease was not granted in time
          ├── LeaseDeadlock                (states.errors) a task waits for a model its own lease blocks
          ├── NotRunning                   acquire() outside ``async with orch``
          └── BackendError                 a backend failed; ``model`` names it
               ├── LoadFailed              loading (or restoring) raised
               ├── UnloadFailed            unloading (or offloading) raised or timed out
               ├── BackendCrashed          a resident's process died while it was in use
               ├── BackendOutOfMemory      the device refused an allocation
               └── VRAMNotReleased         unloaded, but the device still shows the bytes
"""

from __future__ import annotations

from collections.abc import Sequence

from states.errors import IllegalTransition, InsufficientVRAM, LeaseDeadlock, OrchestratorError

__all__ = [
    "AcquireTimeout",
    "BackendCrashed",
    "BackendError",
    "BackendOutOfMemory",
    "ConfigError",
    "IllegalTransition",
    "InsufficientVRAM",
    "LeaseDeadlock",
    "LoadFailed",
    "NotRunning",
    "OrchestratorError",
    "UnknownModel",
    "UnloadFailed",
    "VRAMNotReleased",
]


class ConfigError(OrchestratorError, ValueError):
    """A config file (or mapping) is invalid."""

    def __init__(self, source: str, key: str, problem: str, fix: str) -> None:
        self.source, self.key, self.problem, self.fix = source, key, problem, fix
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}; {fix}")


class UnknownModel(OrchestratorError, LookupError):
    def __init__(self, name: str, models: Sequence[str], kinds: Sequence[str]) -> None:
        self.name = name
        super().__init__(
            f"unknown model or kind {name!r}; configured models: {', '.join(sorted(models)) or '(none)'}"
            f"; kinds with a default: {', '.join(sorted(kinds)) or '(none)'}"
        )

    def __str__(self) -> str:  # LookupError would repr() the message
        return str(self.args[0])


class AcquireTimeout(OrchestratorError, TimeoutError):
    def __init__(self, model: str, timeout_s: float, position: int, queued: int, holding: str) -> None:
        self.model, self.timeout_s, self.position, self.queued = model, timeout_s, position, queued
        self.holding = holding
        super().__init__(
            f"no lease on {model!r} within {timeout_s:g} s: it was number {position} of {queued} "
            f"waiting; the GPU holds {holding}; raise timeout=, lower the load on other models, "
            "or give this request a higher priority="
        )


class LeaseEnded(OrchestratorError):
    """``lease.handle`` was used after the lease's block ended."""

    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__(
            f"the lease on {model!r} ended with its block, and its handle with it; "
            f"use the handle inside `async with orch.acquire({model!r}) as lease:`"
        )


class NotRunning(OrchestratorError):
    def __init__(self) -> None:
        super().__init__(
            "the orchestrator is not running; use `async with orch:` (or ModelManager for sync code) "
            "around acquire()"
        )


class BackendError(OrchestratorError):
    """A backend failed. ``model`` names it; ``__cause__`` is the original error."""

    action = "use"

    def __init__(self, model: str, detail: str) -> None:
        self.model, self.detail = model, detail
        super().__init__(f"{self.action} of {model!r} failed: {detail}")


class LoadFailed(BackendError):
    action = "load"


class UnloadFailed(BackendError):
    action = "unload"


class BackendCrashed(BackendError):
    """The model's process died; raised from the ``async with acquire(...)`` blocks that held
    it. The next acquire starts it again (after a back-off when it keeps crashing)."""

    action = "serving"


class BackendOutOfMemory(BackendError):
    action = "allocation"


class VRAMNotReleased(BackendError):
    """After an unload, the device did not give the memory back before the deadline."""

    action = "release of the memory"
