"""The design document's API, kept: ``ModelManager`` over the ``Orchestrator``.

``ModelManager`` works from sync code (``with manager.use_sdxl() as pipe:``), from a sync
``with`` inside a coroutine (as the design's Example 1 does), and from async code
(``async with manager.use_llm():``). It runs its orchestrator on an event loop of its own in a
background thread (started on first use, stopped by ``cleanup()``), so a blocking ``with``
in a coroutine waits without stalling that thread's loop.

In new async code, prefer ``Orchestrator`` and ``async with orch.acquire(...)`` directly: it
runs on your own event loop, with no thread in between.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.from_thread

from orchestrator.core import Lease, Orchestrator
from states.ledger import Ledger
from states.machine import State


class ModelUse:
    """One ``use_*()`` call: a sync and async context manager that yields the model's handle."""

    def __init__(
        self, manager: ModelManager, name_or_kind: str, timeout: float | None, priority: int
    ) -> None:
        self._manager = manager
        self._name = name_or_kind
        self._timeout = timeout
        self._priority = priority
        self._cm: AbstractContextManager[Lease] | None = None
        self.lease: Lease | None = None

    def __enter__(self) -> Any:
        if self._cm is not None:
            raise RuntimeError("this use_*() context is already entered; call use_*() again for another")
        portal = self._manager._portal_or_start()
        cm = portal.wrap_async_context_manager(
            self._manager.orchestrator.acquire(self._name, timeout=self._timeout, priority=self._priority)
        )
        self.lease = cm.__enter__()
        self._cm = cm
        return self.lease.handle

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        cm, self._cm = self._cm, None
        self.lease = None
        if cm is None:
            return None
        return cm.__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> Any:
        return await anyio.to_thread.run_sync(self.__enter__)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return await anyio.to_thread.run_sync(self.__exit__, exc_type, exc, tb)


class ModelManager:
    """Dynamic model switching, as the design document describes it.

    :param config_path: a YAML config; ``None`` uses the embedded default (the design's
        16 GiB card on the simulated device).
    :param orchestrator: use this (not yet running) orchestrator instead of building one.
    """

    def __init__(
        self, config_path: str | Path | None = None, *, orchestrator: Orchestrator | None = None
    ) -> None:
        self.orchestrator = (
            orchestrator if orchestrator is not None else Orchestrator.from_config(config_path)
        )
        self._lock = threading.Lock()
        self._portal_cm: Any = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._orch_cm: AbstractContextManager[Orchestrator] | None = None

    # -- the design document's calls -------------------------------------------------------

    def use_llm(
        self, model: str | None = None, *, timeout: float | None = None, priority: int = 0
    ) -> ModelUse:
        """Hold an LLM (the default one, or ``model``) for the ``with`` block."""
        return self.use(model or "llm", timeout=timeout, priority=priority)

    def use_sdxl(
        self, model: str | None = None, *, timeout: float | None = None, priority: int = 0
    ) -> ModelUse:
        """Hold an SDXL pipeline for the ``with`` block; ``as`` gives the pipeline."""
        return self.use(model or "sdxl", timeout=timeout, priority=priority)

    def use_tts(
        self, model: str | None = None, *, timeout: float | None = None, priority: int = 0
    ) -> ModelUse:
        """Hold a TTS model for the ``with`` block; ``as`` gives the model."""
        return self.use(model or "tts", timeout=timeout, priority=priority)

    def use(self, name_or_kind: str, *, timeout: float | None = None, priority: int = 0) -> ModelUse:
        self.orchestrator.resolve(name_or_kind)  # fail early, in the caller, on a typo
        return ModelUse(self, name_or_kind, timeout, priority)

    def cleanup(self) -> None:
        """Unload every model and stop the background loop. The manager can be used again."""
        with self._lock:
            orch_cm, self._orch_cm = self._orch_cm, None
            portal_cm, self._portal_cm = self._portal_cm, None
            self._portal = None
        try:
            if orch_cm is not None:
                orch_cm.__exit__(None, None, None)
        finally:
            if portal_cm is not None:
                portal_cm.__exit__(None, None, None)

    @property
    def state(self) -> State:
        return self.orchestrator.state

    def ledger(self) -> Ledger:
        return self.orchestrator.ledger()

    def get_status(self) -> dict[str, Any]:
        """The state and who holds what, for logs."""
        ledger = self.orchestrator.ledger()
        return {
            "state": self.state.name,
            "resident": {
                r.model: {"tier": r.tier.value, "vram_bytes": r.vram_bytes} for r in ledger.residents
            },
            "committed_bytes": ledger.committed_bytes,
            "budget_bytes": ledger.budget_bytes,
            "running": self._portal is not None,
        }

    def __enter__(self) -> ModelManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- the background loop ---------------------------------------------------------------

    def _portal_or_start(self) -> anyio.from_thread.BlockingPortal:
        with self._lock:
            if self._portal is None:
                portal_cm = anyio.from_thread.start_blocking_portal(name="vram-orchestrator")
                portal = portal_cm.__enter__()
                try:
                    orch_cm = portal.wrap_async_context_manager(self.orchestrator)
                    orch_cm.__enter__()
                except BaseException:
                    portal_cm.__exit__(None, None, None)
                    raise
                self._portal_cm, self._portal, self._orch_cm = portal_cm, portal, orch_cm
            return self._portal
