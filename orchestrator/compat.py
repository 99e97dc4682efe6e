"""The Model Management Module's API, kept: ``ModelManager`` and ``ServiceController`` over the
``Orchestrator``.

``ModelManager`` works from sync code (``with manager.use_sdxl() as pipe:``), from a sync
``with`` inside a coroutine (as the module's Example 1 does), and from async code
(``async with manager.use_llm():``). It runs its orchestrator on an event loop of its own in a
background thread (started on first use, stopped by ``cleanup()``), so a blocking ``with``
in a coroutine waits without stalling that thread's loop.

In new async code, prefer ``Orchestrator`` and ``async with orch.acquire(...)`` directly: it
runs on your own event loop, with no thread in between.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.from_thread

from orchestrator.errors import OrchestratorError
from orchestrator.runtime import Lease, Orchestrator
from states.ledger import Ledger
from states.machine import State
from states.units import GIB

logger = logging.getLogger("orchestrator.compat")


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
    """Dynamic model switching, as the Model Management Module describes it.

    :param config_path: a YAML config; ``None`` uses the embedded default (the module's
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
        self._loop: _LoopThread | None = None
        self._atexit_registered = False
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._orch_cm: AbstractContextManager[Orchestrator] | None = None

    # -- the Model Management Module's calls ----------------------------------------------

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
            loop, self._loop = self._loop, None
            self._portal = None
        try:
            if orch_cm is not None:
                orch_cm.__exit__(None, None, None)
        finally:
            if loop is not None:
                loop.stop()

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
                loop = _LoopThread()
                try:
                    orch_cm = loop.portal.wrap_async_context_manager(self.orchestrator)
                    orch_cm.__enter__()
                except BaseException:
                    loop.stop()
                    raise
                self._loop, self._portal, self._orch_cm = loop, loop.portal, orch_cm
                if not self._atexit_registered:
                    # A script that never calls cleanup() (the module's Example 3) still
                    # unloads everything, server processes included, when it exits.
                    atexit.register(_cleanup_at_exit, weakref.ref(self))
                    self._atexit_registered = True
            return self._portal


def _cleanup_at_exit(ref: weakref.ReferenceType[ModelManager]) -> None:
    manager = ref()
    if manager is not None:
        manager.cleanup()


class _LoopThread:
    """An event loop in a daemon thread, and a portal into it.

    A daemon thread does not keep a script from exiting, and it still runs when ``atexit``
    handlers do, so the cleanup registered there can unload through it.
    """

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vram-orchestrator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    @property
    def portal(self) -> anyio.from_thread.BlockingPortal:
        assert self._portal is not None
        return self._portal

    def _run(self) -> None:
        async def main() -> None:
            async with anyio.from_thread.BlockingPortal() as portal:
                self._portal = portal
                self._ready.set()
                await portal.sleep_until_stopped()

        try:
            anyio.run(main)
        except BaseException as exc:  # pragma: no cover - the loop failed to start
            self._error = exc
            self._ready.set()

    def stop(self) -> None:
        if self._portal is not None and self._thread.is_alive():
            self._portal.call(self._portal.stop)
        self._thread.join(timeout=30)


@dataclass(frozen=True)
class LLMStatus:
    """``ServiceController.get_llm_status()``: the Model Management Module's fields."""

    model: str
    is_running: bool
    pid: int | None
    url: str | None
    uptime_s: float
    vram_usage_bytes: int

    @property
    def vram_usage_gb(self) -> float:
        return self.vram_usage_bytes / GIB


class ServiceController:
    """The Model Management Module's LLM service control, over the orchestrator.

    ``start_llm`` brings the LLM in through the orchestrator (evicting what must go) and keeps
    it resident until ``stop_llm``, which unloads it and returns once its memory is back. With a
    server backend that is the real server process (its pid, URL and uptime in the status).

    :param config_path: a YAML config; ``None`` uses the embedded default.
    :param manager: share a ``ModelManager`` (and so one orchestrator) with other code.
    """

    def __init__(self, config_path: str | Path | None = None, *, manager: ModelManager | None = None) -> None:
        self.manager = manager if manager is not None else ModelManager(config_path)
        self._pin: ModelUse | None = None
        self._model: str | None = None

    @property
    def orchestrator(self) -> Orchestrator:
        return self.manager.orchestrator

    def _name(self, model: str | None) -> str:
        return self.orchestrator.resolve(model or self._model or "llm").name

    def start_llm(self, model: str | None = None, wait: bool = True, timeout: float | None = None) -> bool:
        """Start (load) the LLM and keep it running; ``True`` once it is ready.

        With ``wait=False`` it returns at once and the start goes on in the background. A start
        that fails returns ``False`` and logs why (the module's contract).
        """
        name = self._name(model)
        if self._pin is not None and self._model == name:
            return True
        if self._pin is not None:
            self.stop_llm(wait=True)
        self._model = name
        use = self.manager.use(name, timeout=timeout)
        if not wait:
            portal = self.manager._portal_or_start()
            portal.start_task_soon(anyio.to_thread.run_sync, self._enter, use)
            return True
        return self._enter(use)

    def _enter(self, use: ModelUse) -> bool:
        try:
            use.__enter__()
        except OrchestratorError as exc:
            logger.error("could not start %s: %s", self._model, exc)
            return False
        self._pin = use
        return True

    def stop_llm(self, wait: bool = True) -> bool:
        """Stop (unload) the LLM to free its VRAM; with ``wait`` returns once the memory is back."""
        if self._model is None:
            return True
        pin, self._pin = self._pin, None
        if pin is not None:
            pin.__exit__(None, None, None)
        if self.manager.get_status()["running"]:
            portal = self.manager._portal_or_start()
            if wait:
                portal.call(self.orchestrator.unload, self._model)
            else:
                portal.start_task_soon(self.orchestrator.unload, self._model)
        return True

    def is_llm_running(self) -> bool:
        """Whether the LLM is loaded (and, for a server it started, its process alive)."""
        name = self._name(None)
        if not self.orchestrator.ledger().on_gpu(name):
            return False
        return self.orchestrator.backends[name].is_alive()

    def get_llm_status(self) -> LLMStatus:
        name = self._name(None)
        backend = self.orchestrator.backends[name]
        running = self.is_llm_running()
        r = self.orchestrator.ledger().get(name)
        measured = backend.measured_bytes() if running else 0
        return LLMStatus(
            model=name,
            is_running=running,
            pid=backend.pid,
            url=backend.url,
            uptime_s=backend.uptime_s,
            vram_usage_bytes=measured if measured else (r.vram_bytes if r is not None and running else 0),
        )

    def cleanup(self) -> None:
        self.stop_llm(wait=True)
        self.manager.cleanup()
