"""An in-process model's side of the packed disk cache: its entry, a cold load from it, and the
write after a load from the source (``orchestrator.backends.diskcache`` holds the format).

``InProcessBackend`` keeps what is the model's: the memory limit and the simulated device's
stand-in (through the ``check`` and ``fallback`` it passes), its state, its timings and where
the last load came from. This module keeps what is the cache's: whether the entry can be used,
the read started while the skeleton is built, and the one warning when the entry cannot be
used or written (the model then loads from the source, and the load goes on).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.backends.diskcache import CacheEntry, DiskCache
from orchestrator.backends.diskread import CacheCorrupt
from orchestrator.backends.inprocess_options import quiet_imports
from orchestrator.backends.packed import LayoutMismatch, PackedWeights
from orchestrator.device.base import DeviceOutOfMemory
from orchestrator.spec import CacheSpec

# The warnings are the in-process backend's (a user filters them under its logger's name).
logger = logging.getLogger("orchestrator.inprocess")


@dataclass(frozen=True)
class CachedLoad:
    """What a load from the cache made: the handle and the modules holding its weights (now
    views of ``packed``), and the figures of the read (``read_s``, and so on)."""

    model: Any
    modules: dict[str, Any]
    packed: PackedWeights
    timings: dict[str, float]
    built_s: float  # from the load's start until the skeleton was built


class ModelCache:
    """One model's place in the disk cache (``cache:`` of the config; None: no cache)."""

    def __init__(self, model: str, cache: CacheSpec | None) -> None:
        self.model = model
        self.disk = (
            DiskCache(Path(cache.path), cache.budget_bytes, verify=cache.verify)
            if cache is not None
            else None
        )
        self._entry: CacheEntry | None = None

    def entry(
        self, recipe: Callable[[], Mapping[str, Any]], sources: Callable[[], Sequence[Path]]
    ) -> CacheEntry | None:
        """The model's entry (found from its ``recipe`` and ``sources`` on the first call);
        None without a cache."""
        if self.disk is None:
            return None
        if self._entry is None:
            self._entry = self.disk.entry(self.model, recipe(), sources())
        return self._entry

    def load(
        self,
        entry: CacheEntry,
        *,
        build: Callable[[], tuple[Any, dict[str, Any]]],
        device: str,
        keep_host: bool,
        check: Callable[[int], None],
        fallback: Callable[[], None],
        t0: float,
    ) -> CachedLoad | None:
        """Load from ``entry`` (in the worker thread): ``build`` makes the skeleton while the
        data file is read, ``check`` is called with the weights' bytes before anything goes
        to ``device`` (its ``DeviceOutOfMemory`` goes to the caller). None (one warning when
        the entry exists but cannot be used, after ``fallback`` undid what ``check`` took)
        to load from the source instead."""
        state = entry.state()
        if state != "fresh":
            if state != "missing":
                logger.warning(
                    "%s: its disk cache entry %s is %s (%s); loading from the source and rewriting it",
                    self.model,
                    entry.folder,
                    state,
                    "a source file changed since it was written" if state == "stale" else "unreadable",
                )
            return None
        entry.prefetch(device, keep_host=keep_host)  # read while the skeleton is built
        try:
            with quiet_imports():
                model, modules = build()
            built_s = time.perf_counter() - t0
            packed, timings = entry.load(
                modules, device=device, keep_host=keep_host, pin=device != "cpu", check=check
            )
        except DeviceOutOfMemory:
            raise
        except Exception as exc:  # CacheCorrupt, LayoutMismatch, or a skeleton the library refused
            if not isinstance(exc, CacheCorrupt | LayoutMismatch):
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            logger.warning(
                "%s: its disk cache entry %s cannot be used (%s); loading from the source and rewriting it",
                self.model,
                entry.folder,
                exc,
            )
            fallback()
            return None
        finally:
            entry.cancel_prefetch()  # a read the load did not take over (the skeleton failed)
        return CachedLoad(model, modules, packed, timings, built_s)

    def write(
        self,
        entry: CacheEntry,
        packed: PackedWeights,
        *,
        started_s: float,
        sources: list[list[Any]] | None,
        timings: dict[str, float],
    ) -> None:
        """Write ``packed`` as ``entry`` (unless another writer did since ``started_s``, when
        the load began) and record ``cache_write_s`` in ``timings``. A full disk or a
        read-only folder costs the cache, not the load: one warning."""
        t0 = time.perf_counter()
        try:
            entry.write(packed, unless_written_after_s=started_s, sources=sources)
        except OSError as exc:
            logger.warning("%s: could not write its disk cache entry %s (%s)", self.model, entry.folder, exc)
            return
        timings["cache_write_s"] = time.perf_counter() - t0
