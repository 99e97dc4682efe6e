"""The disk tier at disk speed: a packed checkpoint cache for in-process models.

The tier ladder of an in-process model is GPU -> pinned host RAM -> packed disk cache ->
original source. After a model's first load from its source (``from_pretrained``: module
construction, many small reads, dtype conversions, a LoRA fused in), its weights are written
once, in the layout ``PackedWeights`` keeps in host RAM, to a cache folder. A later cold load
builds the modules without initialising their weights (accelerate's ``init_empty_weights``:
parameters on the meta device) and brings the one data file in with several threads, in large
chunks, while the skeleton is being built (``prefetch``). On a GPU the file is read straight
into the pinned buffer the weights will live in (or a small pinned staging ring), each chunk
copied to the device as soon as it has arrived, on a side stream, so the disk read and the
host-to-device copy overlap (ServerlessLLM, OSDI 2024, showed this layout loads several times
faster than safetensors and reaches the storage's bandwidth). On the CPU without a host tier
the weights are the data file's own pages: a private mapping, populated chunk by chunk
(``diskread.MappedRead``), nothing copied, as ``from_pretrained`` maps safetensors. Every
tensor then becomes a view of that one buffer.

One entry per model and recipe (``<cache>/<model>-<hash of the recipe>/``):

- ``weights-<token>.bin``: every distinct tensor's bytes (tied weights once), each slice
  256-byte aligned, exactly the packed host buffer;
- ``index.json``: the format, the model, the recipe (backend type, dtype, pipeline, LoRA and
  its scale, ControlNet), the sources it was built from (every file's path, size and
  modification time), the data file's name and size, and every slot (offset, bytes, dtype,
  shape, and each place the tensor is found: component, qualified name, parameter or buffer).

A changed source file (a retrained LoRA, a replaced ControlNet, ``touch``) makes the entry
stale: the next load comes from the source again and rewrites it. Writers are safe against
each other and against a crash: the data goes to a ``.tmp`` name, is fsynced and renamed to
its own unique name, then the index is written the same way and renamed over the old one (the
rename is atomic), under an exclusive lock on the entry's ``.lock`` (writers take turns; one
that finds the entry freshly written by another while it was loading leaves it). A reader that finds
the index unreadable, the data file missing or of the wrong size, or a tensor layout that is
not the model's, falls back to the source with one warning. Bit flips inside the data file
are caught by the per-chunk checksum the index keeps (``diskread.checksum``) when
``cache.verify`` is on (the default): each chunk is checked by its reader thread once it is in.

The cache has its own size budget (``cache.budget_gb``): after a write, the least recently
used entries (by the last load from them) are removed until the cache fits.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.backends.diskread import (
    CAN_MAP,
    CHUNK_BYTES,
    CacheCorrupt,
    MappedRead,
    _read_to_device,
    _stream_to_device,
    checksum,
    read_into,
)
from orchestrator.backends.packed import ALIGN_BYTES, PackedWeights, SlotRecord

logger = logging.getLogger("orchestrator.diskcache")

FORMAT = 1
INDEX_NAME = "index.json"
LOCK_NAME = ".lock"
STALE_TMP_S = 3600.0  # a writer's .tmp file untouched this long was left by a crash


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vram-orchestrator" / "checkpoints"


def fingerprint(paths: Sequence[Path]) -> list[list[Any]]:
    """Every file of ``paths`` (folders walked, in a stable order): [path, size, mtime in ns]."""
    out: list[list[Any]] = []
    for root in paths:
        if root.is_file():
            st = root.stat()
            out.append([str(root), st.st_size, st.st_mtime_ns])
            continue
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                p = os.path.join(folder, name)
                st = os.stat(p)
                out.append([p, st.st_size, st.st_mtime_ns])
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64] or "model"


@dataclass(frozen=True)
class EntryInfo:
    """One cache entry as ``cache list`` shows it."""

    key: str
    model: str
    data_bytes: int
    last_used_s: float  # the last load from it (or its writing), seconds since the epoch
    fresh: bool  # its sources are unchanged (False: the next load rebuilds it)
    path: Path


class DiskCache:
    """The cache folder ``root`` and its size budget."""

    def __init__(self, root: Path, budget_bytes: int, *, verify: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.budget_bytes = budget_bytes
        self.verify = verify

    def entry(self, model: str, recipe: Mapping[str, Any], sources: Sequence[Path]) -> CacheEntry:
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()
        return CacheEntry(self, f"{_safe(model)}-{digest[:16]}", model, dict(recipe), tuple(sources))

    # -- the whole cache ---------------------------------------------------------------------

    def _entry_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and (p / INDEX_NAME).exists())

    def entries(self) -> list[EntryInfo]:
        """Every readable entry, the most recently used first."""
        out = []
        for d in self._entry_dirs():
            try:
                index = _read_index(d)
                sources = [Path(s[0]) for s in index["sources"]]
                fresh = _sources_of(index) == _current(sources)
                out.append(
                    EntryInfo(
                        d.name,
                        str(index["model"]),
                        int(index["data_bytes"]),
                        (d / INDEX_NAME).stat().st_mtime,
                        fresh,
                        d,
                    )
                )
            except (CacheCorrupt, OSError, KeyError, TypeError, ValueError):
                continue
        return sorted(out, key=lambda e: -e.last_used_s)

    def used_bytes(self) -> int:
        return sum(e.data_bytes for e in self.entries())

    def clear(self, model: str | None = None) -> list[str]:
        """Remove every entry (or ``model``'s); returns the keys removed."""
        removed: list[str] = []
        if not self.root.is_dir():
            return removed
        for d in sorted(self.root.iterdir()):
            if not d.is_dir():
                continue
            if model is not None:
                try:
                    if _read_index(d).get("model") != model:
                        continue
                except (CacheCorrupt, OSError):
                    continue
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
        return removed

    def enforce_budget(self, keep: str | None = None) -> list[str]:
        """Remove the least recently used entries (never ``keep``) until the cache fits."""
        entries = self.entries()
        total = sum(e.data_bytes for e in entries)
        removed = []
        for e in reversed(entries):  # oldest first
            if total <= self.budget_bytes:
                break
            if e.key == keep:
                continue
            shutil.rmtree(e.path, ignore_errors=True)
            total -= e.data_bytes
            removed.append(e.key)
            logger.info("disk cache: removed %s (least recently used; over the budget)", e.key)
        return removed


def _read_index(folder: Path) -> dict[str, Any]:
    try:
        index = json.loads((folder / INDEX_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheCorrupt(f"its index cannot be read ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CacheCorrupt("its index is not of this version's format")
    return index


def _sources_of(index: Mapping[str, Any]) -> list[list[Any]]:
    return [list(s) for s in index["sources"]]


def _current(sources: Sequence[Path]) -> list[list[Any]]:
    try:
        return fingerprint(sources)
    except OSError:
        return []


@dataclass
class CacheEntry:
    """One model's entry: is it usable, load from it, write it."""

    cache: DiskCache
    key: str
    model: str
    recipe: dict[str, Any]
    sources: tuple[Path, ...]
    #: the read ``prefetch`` started and the index it read (``load`` takes it over)
    _pending: tuple[dict[str, Any], MappedRead] | None = field(default=None, repr=False, compare=False)

    @property
    def folder(self) -> Path:
        return self.cache.root / self.key

    def state(self) -> str:
        """``fresh`` (the next load comes from it), ``missing``, ``stale`` (a source changed)
        or ``corrupt``: cheap (the index and the files' sizes and times, no data read)."""
        if not (self.folder / INDEX_NAME).exists():
            return "missing"
        try:
            index = self._index()
        except CacheCorrupt:
            return "corrupt"
        return "fresh" if _sources_of(index) == _current(self.sources) else "stale"

    def _index(self) -> dict[str, Any]:
        index = _read_index(self.folder)
        try:
            data = self.folder / str(index["data"])
            if index["recipe"] != json.loads(json.dumps(self.recipe, default=str)):
                raise CacheCorrupt("its recipe is not this model's")
            if data.stat().st_size != int(index["data_bytes"]):
                raise CacheCorrupt(
                    f"its data file is {data.stat().st_size} bytes, the index says {index['data_bytes']}"
                )
            _sources_of(index)
            self._layout(index)
        except FileNotFoundError:
            raise CacheCorrupt("its data file is missing") from None
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CacheCorrupt):
                raise
            raise CacheCorrupt(f"its index is incomplete ({type(exc).__name__}: {exc})") from None
        return index

    @staticmethod
    def _layout(index: Mapping[str, Any]) -> list[SlotRecord]:
        return [
            SlotRecord(
                int(t["offset"]),
                int(t["nbytes"]),
                str(t["dtype"]),
                tuple(int(d) for d in t["shape"]),
                tuple((str(c), str(q), bool(p)) for c, q, p in t["places"]),
            )
            for t in index["tensors"]
        ]

    # -- reading -----------------------------------------------------------------------------

    @staticmethod
    def _maps(device: Any, keep_host: bool) -> bool:
        """Whether a load to ``device`` maps the data file (the CPU, no host tier, POSIX)."""
        import torch

        return torch.device(device).type == "cpu" and not keep_host and CAN_MAP

    def prefetch(self, device: Any, *, keep_host: bool) -> bool:
        """Start bringing the data file in now, in the background, while the caller builds
        the modules' skeleton (0.4-1 s for SDXL): the next ``load`` takes the read over.
        Only where the load maps the file (the CPU without a host tier), which allocates
        nothing but the page cache: elsewhere, and for an entry that cannot be read (``load``
        then says why), nothing happens. True when a read was started."""
        self.cancel_prefetch()
        if not self._maps(device, keep_host):
            return False
        try:
            index = self._index()
            self._pending = (index, self._mapped_read(index))
        except (CacheCorrupt, OSError):
            return False
        return True

    def cancel_prefetch(self) -> None:
        """Stop a read ``prefetch`` started that no ``load`` took over."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[1].cancel()

    def _mapped_read(self, index: Mapping[str, Any]) -> MappedRead:
        return MappedRead(
            self.folder / str(index["data"]),
            int(index["data_bytes"]),
            chunk_bytes=int(index["chunk_bytes"]),
            sums=[int(c) for c in index["sum64"]] if self.cache.verify else None,
        )

    def load(
        self,
        modules: Mapping[str, Any],
        *,
        device: Any,
        keep_host: bool,
        pin: bool,
        check: Callable[[int], None] | None = None,
    ) -> tuple[PackedWeights, dict[str, float]]:
        """Fill the skeleton ``modules`` from this entry; the tensors end as views of one
        buffer on ``device`` (and, with ``keep_host``, of the host copy too). ``check`` is
        called with the weights' bytes before anything is allocated (it may raise).

        ``CacheCorrupt`` (or ``LayoutMismatch``) when the entry cannot be used; the modules
        are then still a skeleton, and the caller loads from the source.
        """
        import torch

        t0 = time.perf_counter()
        device = torch.device(device)
        maps = self._maps(device, keep_host)
        pending, self._pending = self._pending, None
        try:
            index = pending[0] if pending is not None and maps else self._index()
            total = int(index["data_bytes"])
            layout = self._layout(index)
            sums = [int(c) for c in index["sum64"]] if self.cache.verify else None
            chunk = int(index["chunk_bytes"])
            path = self.folder / str(index["data"])
            timings: dict[str, float] = {}
            if check is not None:
                check(total)
            if maps:
                # On the CPU without a host tier: the weights are the data file's own pages,
                # in a private mapping (no copy into fresh memory, as from_pretrained's
                # safetensors map), brought in and checked chunk by chunk in threads (since
                # ``prefetch``, while the skeleton was built, or from now).
                packed = PackedWeights.for_layout(modules, layout, total, pin=False, host=False)
                read = pending[1] if pending is not None else self._mapped_read(index)
                packed.adopt_device_buffer(read.result(), device)
                timings["read_s"] = read.read_s
                timings["read_wait_s"] = time.perf_counter() - t0
            elif device.type == "cuda":
                packed = PackedWeights.for_layout(modules, layout, total, pin=pin, host=keep_host)
                buf = torch.empty(total, dtype=torch.uint8, device=device)
                if keep_host:  # read into the pinned host copy, each chunk copied on as it arrives
                    _read_to_device(path, packed.host, buf, chunk, sums)
                else:  # through a small pinned staging ring: no host copy to pin
                    _stream_to_device(path, buf, chunk, sums)
                packed.adopt_device_buffer(buf, device)
                timings["read_s"] = time.perf_counter() - t0
            else:
                # The host tier on the CPU stand-in: read into its own buffer, then copied once.
                packed = PackedWeights.for_layout(modules, layout, total, pin=False, host=True)
                read_into(path, packed.host, chunk_bytes=chunk, sums=sums)
                timings["read_s"] = time.perf_counter() - t0
        finally:
            if pending is not None:  # stops a read no branch took over (after result(): a no-op)
                pending[1].cancel()
        packed.point()
        if device.type != "cuda" and keep_host:
            timings["copy_s"] = packed.to_device(device)
        with contextlib.suppress(OSError):
            os.utime(self.folder / INDEX_NAME)  # the LRU's "last used"
        return packed, timings

    # -- writing -----------------------------------------------------------------------------

    def write(
        self,
        packed: PackedWeights,
        *,
        unless_written_after_s: float | None = None,
        sources: list[list[Any]] | None = None,
    ) -> bool:
        """Write ``packed``'s layout and its host copy's bytes as this entry; False when it
        does not fit the budget.

        Writers of one entry take turns (an exclusive lock on its folder's ``.lock``); one
        that finds a fresh entry written after ``unless_written_after_s`` (wall-clock
        seconds: when its own load began) leaves it as it is: another process wrote the same
        weights meanwhile. ``sources``: the sources' ``fingerprint`` taken before the weights
        were read from them (default: now), so a file changed during the load is seen as a
        change at the next one.
        """
        if packed.host is None:
            raise ValueError("only weights with a host copy can be written to the disk cache")
        self.cancel_prefetch()  # a read of the data file this write replaces
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOCK_NAME, "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                if unless_written_after_s is not None and self.state() == "fresh":
                    with contextlib.suppress(CacheCorrupt, KeyError, TypeError, ValueError):
                        if float(_read_index(self.folder)["written_s"]) > unless_written_after_s:
                            return True
                return self._write_locked(
                    packed, sources if sources is not None else fingerprint(self.sources)
                )
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _write_locked(self, packed: PackedWeights, sources: list[list[Any]]) -> bool:
        total = packed.total_bytes
        if total > self.cache.budget_bytes:
            logger.info(
                "disk cache: %s not cached: %d bytes is more than the cache budget (%d)",
                self.model,
                total,
                self.cache.budget_bytes,
            )
            return False
        folder = self.folder
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        data_name = f"weights-{token}.bin"
        tmp = folder / f"{data_name}.tmp"
        chunk = CHUNK_BYTES
        sums: list[int] = []
        with open(tmp, "wb") as f:
            view = memoryview(packed.host.numpy())
            for off in range(0, total, chunk):
                piece = view[off : off + chunk]
                sums.append(checksum(piece))
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, folder / data_name)
        index = {
            "format": FORMAT,
            "model": self.model,
            "key": self.key,
            "recipe": json.loads(json.dumps(self.recipe, default=str)),
            "sources": sources,
            "data": data_name,
            "data_bytes": total,
            "align": ALIGN_BYTES,
            "chunk_bytes": chunk,
            "sum64": sums,
            "written_s": time.time(),
            "modules": list(packed.names),
            "tensors": [
                {
                    "offset": r.offset,
                    "nbytes": r.nbytes,
                    "dtype": r.dtype,
                    "shape": list(r.shape),
                    "places": [list(p) for p in r.places],
                }
                for r in packed.layout()
            ],
        }
        itmp = folder / f"{INDEX_NAME}.{token}.tmp"
        with open(itmp, "w") as f:
            json.dump(index, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(itmp, folder / INDEX_NAME)
        _fsync_dir(folder)
        self._tidy(data_name)
        self.cache.enforce_budget(keep=self.key)
        return True

    def _tidy(self, current: str) -> None:
        """Remove data files no index names (an older write's, or a writer that lost)."""
        try:
            named = str(_read_index(self.folder).get("data"))
        except CacheCorrupt:
            named = current
        now = time.time()
        for p in self.folder.iterdir():
            if p.name in (named, INDEX_NAME, LOCK_NAME):
                continue
            other = not p.name.endswith(".tmp")  # a writer's .tmp goes once untouched for long
            with contextlib.suppress(OSError):
                if other or now - p.stat().st_mtime > STALE_TMP_S:
                    p.unlink()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
