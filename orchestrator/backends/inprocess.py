"""In-process torch models (diffusers pipelines, TTS): loading, the three tiers, accounting.

A subclass says how to build its model from a local path on the CPU (``_build``) and which
``torch.nn.Module``\\ s hold its weights; this class does the rest, the same way for all:

- ``load`` builds the model in a worker thread (never on the event loop). A model whose config
  says ``offload: true`` is packed into one host buffer (pinned on a CUDA machine) at load
  time, and its GPU copy comes from that buffer in one copy (``PackedWeights``): the host copy
  exists from the first load on, so every later offload is free (no copy back) and every
  restore is one copy at the link's speed. Other models move with ``module.to(device)``.
- Before anything goes to the GPU, the weights' bytes are checked against the reservation
  (``limit_bytes``): a model larger than its estimate fails with an out-of-memory that says
  what it needs, before it takes the memory.
- ``offload(HOST)`` re-points the weights at the host copy and drops the device buffer;
  ``offload(DISK)`` and ``unload()`` drop every reference, collect, and empty torch's cache.
- With a ``cache:`` in the config, the first load from the source also writes the packed
  weights to the disk cache (``orchestrator.backends.diskcache``), and later cold loads come
  from there: the modules built without their weights (``_build_skeleton``), one file read
  in large chunks straight into the buffer the weights live in. A stale or damaged entry
  falls back to the source (one warning) and is rewritten. The tier ladder: GPU -> pinned
  host RAM -> packed disk cache -> the source; ``cached`` says where the next cold load
  comes from, ``last_load_from`` where the last one came from. The entry, the load from it
  and the write to it are ``inprocess_cache.ModelCache``'s; the memory limit, the stand-in,
  the timings and the model's state stay here.
- Where the device is the simulated one (no GPU: tests, CI, the demo), the model runs on the
  CPU for real and its configured size stands for it on the simulated device (the tiny model
  plays the role of the full-size one, whose bytes are what the budget is about).
"""

from __future__ import annotations

import abc
import dataclasses
import gc
import logging
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import anyio

from orchestrator.backends.base import Backend
from orchestrator.backends.diskcache import CacheEntry, fingerprint
from orchestrator.backends.inprocess_cache import ModelCache
from orchestrator.backends.inprocess_options import InProcessOptions, import_torch, quiet_imports
from orchestrator.backends.options import options_of
from orchestrator.backends.packed import PackedWeights
from orchestrator.device.base import Device, DeviceOutOfMemory
from orchestrator.device.simulated import SimulatedDevice
from orchestrator.spec import CacheSpec, ModelSpec
from states.ledger import Tier

logger = logging.getLogger("orchestrator.inprocess")


class InProcessBackend(Backend):
    """A torch model that lives in this process. Subclasses implement ``_build``."""

    #: the extra to install for this backend's libraries (named in messages)
    extra = "diffusers"
    #: options that do not change the weights (not part of the disk cache's recipe)
    recipe_ignores: tuple[str, ...] = ()

    def __init__(
        self, spec: ModelSpec, device: Device, device_index: int = 0, *, cache: CacheSpec | None = None
    ) -> None:
        super().__init__(spec.name, spec.kind, spec.vram_bytes)
        self.spec = spec
        self.options = options_of(spec, InProcessOptions)
        self.path = self.options.path
        self.device_index = device_index
        # On the simulated device the model runs on the CPU and stands in for the real one.
        self.stand_in = device if isinstance(device, SimulatedDevice) else None
        self.stand_in_bytes = spec.sim.true_vram_bytes if spec.sim is not None else spec.vram_bytes
        self.target = "cpu" if self.stand_in is not None else f"cuda:{device_index}"
        self._model: Any = None  # whatever _build returned as the handle
        self._packed: PackedWeights | None = None
        self._modules: dict[str, Any] = {}
        self._weight_bytes = 0
        self._baseline_reserved = 0
        # figures for benchmarks and status: the last load / restore / offload, in seconds
        self.timings: dict[str, float] = {}
        self.loads = self.restores = self.offloads = 0
        self._unloaded: list[weakref.ref[Any]] = []  # the modules of the last unload, to verify
        self._cache = ModelCache(spec.name, cache)
        #: where the last cold load came from: "cache" or "source" ("" before the first)
        self.last_load_from = ""

    # -- what subclasses provide -------------------------------------------------------------

    @abc.abstractmethod
    def _build(self, torch: Any, dtype: Any) -> tuple[Any, dict[str, Any]]:
        """Build the model on the CPU from ``self.path`` (in a worker thread).

        Returns the handle leases hand out and the modules that hold its weights.
        """

    def _build_skeleton(self, torch: Any, dtype: Any) -> tuple[Any, dict[str, Any]]:
        """The same as ``_build`` with the weights' modules built without their weights
        (parameters on the meta device, ``diskcache.empty_weights``); the disk cache fills
        them. A backend that cannot leaves this as is (its models are not cached)."""
        raise NotImplementedError

    def cache_sources(self) -> list[Path]:
        """The files and folders the weights are built from (a change makes the cache stale)."""
        return [self.path]

    def cache_recipe(self) -> dict[str, Any]:
        """What else decides the weights' bytes: the backend type, the dtype, the options."""
        opts = {
            f.name: (str(v) if isinstance(v, Path) else v)
            for f in dataclasses.fields(self.options)
            if f.name not in self.recipe_ignores and (v := getattr(self.options, f.name)) is not None
        }
        return {"backend": self.spec.backend, "dtype": self._dtype_name(), "options": opts}

    @property
    def cache_entry(self) -> CacheEntry | None:
        """This model's disk cache entry; None without a cache (or a backend that has none)."""
        if type(self)._build_skeleton is InProcessBackend._build_skeleton:
            return None
        return self._cache.entry(self.cache_recipe, self.cache_sources)

    @property
    def cached(self) -> bool:
        """Whether the next cold load comes from the packed disk cache (a fresh entry)."""
        entry = self.cache_entry
        return entry is not None and entry.state() == "fresh"

    # -- sync predicates -------------------------------------------------------------------

    @property
    def supports_host_tier(self) -> bool:
        return self.spec.offload

    @property
    def host_copy_portable(self) -> bool:
        return True

    def bind(self, gpus: tuple[int, ...], devices: tuple[Device, ...]) -> None:
        super().bind(gpus, devices)
        if self.stand_in is None:
            self.target = f"cuda:{gpus[0]}"  # a restore moves the host copy there too
        elif isinstance(devices[0], SimulatedDevice) and devices[0] is not self.stand_in:
            # On simulated cards the stand-in's bytes go to the card it now serves from (what
            # it still holds on the card it left is freed there first: it is not loaded).
            self._drop_stand_in()
            self.stand_in = devices[0]

    def measured_bytes(self, *, live_only: bool = True) -> int | None:
        """The weights' bytes on the device while resident. With ``live_only=False`` (the
        release wait), also what an unloaded model still holds because something outside
        the orchestrator keeps a reference to it (a pipeline kept in a variable)."""
        leaked = [] if live_only else self._still_referenced()
        if self.stand_in is not None:
            held = self.stand_in.held_by(self.owner, live_only=live_only)
            if not live_only:
                held += self.stand_in.held_by(self._unreleased_owner)
            return held
        if self._tier is Tier.GPU:
            return self._weight_bytes
        return sum(
            int(t.numel() * t.element_size())
            for m in leaked
            for t in list(m.parameters()) + list(m.buffers())
            if t.device.type == "cuda"
        )

    def _still_referenced(self) -> list[Any]:
        """The modules of the last unload that are still alive (and frees the stand-in's
        bytes once none is: the memory really came back)."""
        alive = [m for r in self._unloaded if (m := r()) is not None]
        if not alive:
            self._unloaded = []
            if self.stand_in is not None:
                self.stand_in.free(self._unreleased_owner)
        return alive

    @property
    def _unreleased_owner(self) -> str:
        """On the simulated device, who holds an unloaded model's bytes that something outside
        still keeps alive: not the model (which may load again meanwhile), and not ours."""
        return f"{self.owner} (unreleased)"

    def peak_bytes(self) -> int | None:
        """On a GPU: the most torch reserved since this model was loaded, over what it had
        reserved before (the model's weights plus its working memory; switches run one at a
        time, and the process's other in-process models were counted in the baseline)."""
        if self.stand_in is not None or self._tier is not Tier.GPU or "torch" not in sys.modules:
            return None
        torch = sys.modules["torch"]
        reserved = int(torch.cuda.max_memory_reserved(self.target))
        return max(self._weight_bytes, reserved - self._baseline_reserved)

    @property
    def host_copy_bytes(self) -> int:
        return self._packed.total_bytes if self._packed is not None else 0

    # -- helpers ----------------------------------------------------------------------------

    def _local_path(self, path: Path | None, key: str, what: str, *, hint: str = "") -> Path | None:
        """``path`` (option ``key``; None when not given); one that does not exist is a
        ``FileNotFoundError`` naming the model, the path and the config key to fix."""
        if path is not None and not path.exists():
            raise FileNotFoundError(
                f"model {self.name!r}: {what} {path} does not exist; "
                f"fix models.{self.name}.backend.{key} {hint}".rstrip()
            )
        return path

    def _torch(self) -> Any:
        return import_torch(f"backend: {self.spec.backend}", self.extra)

    def _dtype_name(self) -> str:
        name = self.options.dtype
        if name == "auto":  # fp16 on a GPU, fp32 on the CPU (fp16 kernels are missing there)
            return "float32" if self.target == "cpu" else "float16"
        return name

    def _dtype(self, torch: Any) -> Any:
        return getattr(torch, self._dtype_name())

    def _check_limit(self, need_bytes: int, limit_bytes: int | None) -> None:
        if self.stand_in is not None:
            need_bytes = self.stand_in_bytes
        if limit_bytes is not None and need_bytes > limit_bytes:
            raise DeviceOutOfMemory(self.owner, need_bytes, limit_bytes, limit=True)

    def _claim(self, torch: Any, need_bytes: int, limit_bytes: int | None) -> None:
        """Before the weights go to the device: the limit checked, the stand-in's bytes taken,
        and torch's peak counted from here (what ``peak_bytes`` reports over the baseline)."""
        self._check_limit(need_bytes, limit_bytes)
        self._take_stand_in()
        if self.target != "cpu":
            self._baseline_reserved = torch.cuda.memory_reserved(self.target)
            torch.cuda.reset_peak_memory_stats(self.target)

    def _take_stand_in(self) -> None:
        if self.stand_in is not None and not self.stand_in.held_by(self.owner):
            self.stand_in.allocate(self.owner, self.stand_in_bytes)

    def _drop_stand_in(self) -> None:
        if self.stand_in is not None:
            self.stand_in.free(self.owner)

    def _empty_cache(self) -> None:
        torch = sys.modules.get("torch")
        if torch is not None and self.target != "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- actions ----------------------------------------------------------------------------

    async def load(self, limit_bytes: int | None = None) -> Any:
        if self._tier is Tier.GPU and self._model is not None:
            return self._model
        if self._tier is Tier.HOST:
            return await self.restore(limit_bytes)
        self._local_path(
            self.path,
            "path",
            "the model folder",
            hint="(python -m orchestrator.tiny_models DIR builds tiny ones)",
        )
        torch = self._torch()

        def work() -> None:
            t0 = time.perf_counter()
            started_s = time.time()
            dtype = self._dtype(torch)
            entry = self.cache_entry
            if entry is not None and self._load_cached(torch, dtype, entry, limit_bytes, t0):
                return
            sources = fingerprint(entry.sources) if entry is not None else None  # before the reads
            with quiet_imports():
                model, modules = self._build(torch, dtype)
            self._model, self._modules = model, modules
            built_s = time.perf_counter() - t0
            weight_bytes = sum(
                t.numel() * t.element_size()
                for m in modules.values()
                for t in list(m.parameters()) + list(m.buffers())
            )
            self._claim(torch, weight_bytes, limit_bytes)
            if self.spec.offload:
                pin = self.target != "cpu"
                t1 = time.perf_counter()
                self._packed = PackedWeights(modules, pin=pin)
                self.timings["pack_s"] = time.perf_counter() - t1
                if entry is not None:
                    self._cache.write(
                        entry, self._packed, started_s=started_s, sources=sources, timings=self.timings
                    )
                self.timings["copy_s"] = self._packed.to_device(self.target)
                self._weight_bytes = self._packed.total_bytes
            else:
                if entry is not None:  # packed once on the CPU to be written; then moved as usual
                    self._cache.write(
                        entry,
                        PackedWeights(modules, pin=False),
                        started_s=started_s,
                        sources=sources,
                        timings=self.timings,
                    )
                for m in modules.values():
                    m.to(self.target)
                self._weight_bytes = weight_bytes
            self._after_move(torch)
            self.timings["build_s"] = built_s
            self.timings["load_s"] = time.perf_counter() - t0
            self.last_load_from = "source"

        try:
            await anyio.to_thread.run_sync(work)
        except BaseException:
            # The executor unloads after a failed load too; drop what this attempt made now.
            self._forget()
            raise
        self._tier = Tier.GPU
        self._handle = self._model
        self.loads += 1
        return self._model

    def _after_move(self, torch: Any) -> None:
        """Called in the worker thread once the weights are on the target (a hook)."""

    def _load_cached(
        self, torch: Any, dtype: Any, entry: CacheEntry, limit_bytes: int | None, t0: float
    ) -> bool:
        """Load from the disk cache (in the worker thread); False to load from the source."""
        loaded = self._cache.load(
            entry,
            build=lambda: self._build_skeleton(torch, dtype),
            device=self.target,
            keep_host=self.spec.offload,
            check=lambda total_bytes: self._claim(torch, total_bytes, limit_bytes),
            fallback=self._drop_stand_in,
            t0=t0,
        )
        if loaded is None:
            return False
        self._model, self._modules = loaded.model, loaded.modules
        self._packed = loaded.packed if self.spec.offload else None  # without a host tier: no host copy
        self._weight_bytes = loaded.packed.total_bytes
        self._after_move(torch)
        self.timings.update(loaded.timings)
        self.timings["build_s"] = loaded.built_s
        self.timings["load_s"] = time.perf_counter() - t0
        self.last_load_from = "cache"
        return True

    async def restore(self, limit_bytes: int | None = None) -> Any:
        if self._tier is not Tier.HOST or self._packed is None:
            return await self.load(limit_bytes)
        packed = self._packed
        self._check_limit(packed.total_bytes, limit_bytes)
        torch = self._torch()

        def work() -> float:
            if self.target != "cpu":
                self._baseline_reserved = torch.cuda.memory_reserved(self.target)
                torch.cuda.reset_peak_memory_stats(self.target)
            return packed.to_device(self.target)

        self._take_stand_in()
        t0 = time.perf_counter()
        try:
            self.timings["restore_copy_s"] = await anyio.to_thread.run_sync(work)
        except BaseException:
            self._drop_stand_in()
            raise
        self.timings["restore_s"] = time.perf_counter() - t0
        self._weight_bytes = packed.total_bytes
        self._tier = Tier.GPU
        self._handle = self._model
        self.restores += 1
        return self._model

    async def offload(self, tier: Tier) -> None:
        if tier is Tier.DISK or self._packed is None:
            await self.unload()
            return
        t0 = time.perf_counter()
        self._handle = None
        self._packed.to_host()  # no copy back: the host copy is the same weights
        self._empty_cache()  # the device buffer's memory goes back to the driver (NVML sees it)
        self._weight_bytes = 0
        self._drop_stand_in()
        self._tier = Tier.HOST
        self.offloads += 1
        self.timings["offload_s"] = time.perf_counter() - t0

    def _forget(self, *, keep_stand_in: bool = False) -> None:
        if self._packed is not None:
            self._packed.release()
        self._packed = None
        self._model = None
        self._handle = None
        self._modules = {}
        self._weight_bytes = 0
        if not keep_stand_in:
            self._drop_stand_in()

    async def unload(self) -> None:
        if self._tier is Tier.DISK and self._model is None and self._packed is None:
            self._still_referenced()
            return
        t0 = time.perf_counter()
        self._unloaded += [weakref.ref(m) for m in self._modules.values()]
        self._forget(keep_stand_in=True)
        self._tier = Tier.DISK

        def collect() -> None:
            gc.collect()  # pipelines hold reference cycles; only a collection frees them
            self._empty_cache()

        await anyio.to_thread.run_sync(collect)
        alive = self._still_referenced()
        if self.stand_in is not None:
            held = self.stand_in.held_by(self.owner)
            self.stand_in.free(self.owner)
            if alive and held:  # still in use by whoever keeps it: as on a GPU, not free
                self.stand_in.allocate(self._unreleased_owner, held)
        for m in alive:  # when the last of them goes, the memory is back (the stand-in too)
            weakref.finalize(m, self._still_referenced)
        if alive:
            # Not freed: the release wait sees these bytes and fails with VRAMNotReleased
            # naming this model, rather than the ledger counting memory that is not free.
            logger.warning(
                "%s: unloaded, but %s still referenced outside the orchestrator (a pipeline or "
                "lease.handle kept in a variable?); its memory is not free until that goes",
                self.name,
                ", ".join(type(m).__name__ for m in alive),
            )
        self.timings["unload_s"] = time.perf_counter() - t0
