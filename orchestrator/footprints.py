"""Learned footprints: what each model really took, kept across runs.

Estimates in a config are wrong in both directions (measured on an H200: the full SDXL
pipeline peaks at 11.65 GiB on NVML against the Model Management Module's 10.5 GB). After
each load, and after the first use (to catch peaks such as SDXL's VAE decode), the
orchestrator records what the model really held. The estimate it plans with is then the
larger of the configured figure and the learned high-water mark plus a margin.

The same file keeps what the scheduler learned of each model's times (``times``: how long a
load, a restore, an unload and an offload took, and how long a lease is held), so that a
restarted orchestrator weighs its first switches by them instead of by estimates.

The store is a small JSON file in the user's cache directory. It is safe against concurrent
writers (an exclusive ``fcntl`` lock on a side file around read-modify-write, then an atomic
replace) and against a corrupt file (it is set aside as ``*.corrupt`` with a warning, and
learning starts again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger("orchestrator.footprints")

try:  # POSIX; elsewhere the store still works, without the cross-process lock
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

FORMAT_VERSION = 1
# The times a store keeps per model (seconds; ``orchestrator.runtime``: what they mean).
TIMES = ("load_s", "restore_s", "unload_s", "offload_s", "hold_s")


def default_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vram-orchestrator" / "footprints.json"


@dataclass(frozen=True)
class Footprint:
    """What one model (variant) was seen to hold."""

    model: str
    load_bytes: int  # held right after loading
    peak_bytes: int  # the high-water mark, loads and uses included
    samples: int
    updated: float  # unix time

    @property
    def high_water_bytes(self) -> int:
        return max(self.load_bytes, self.peak_bytes)


class FootprintStore:
    """Persisted footprints, keyed by model name (a variant is its own model).

    :param path: the JSON file; ``None`` keeps footprints in memory only.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path).expanduser() if path is not None else None
        self._cache: dict[str, Footprint] = {}
        self._pending: list[tuple[str, int, str]] = []  # noted, not yet flushed
        self._times: dict[str, dict[str, float]] = {}  # model -> what -> seconds
        self._pending_times: dict[tuple[str, str], float] = {}  # the latest of each, not flushed
        self._mutex = threading.Lock()  # note() on the event loop, flush() in a worker thread
        self._flushing = threading.Lock()  # one flush at a time within this process
        if self.path is not None:
            self._cache, self._times = self._read()

    def get(self, model: str) -> Footprint | None:
        return self._cache.get(model)

    def all(self) -> Mapping[str, Footprint]:
        return dict(self._cache)

    def times(self, model: str) -> Mapping[str, float]:
        """What was learned of ``model``'s times (seconds, by name: ``TIMES``), maybe none."""
        return dict(self._times.get(model, {}))

    def note_time(self, model: str, what: str, seconds: float) -> None:
        """Keep the latest figure of one of ``model``'s times in memory (``times`` sees it);
        it is persisted with the next ``flush``. A time is a running estimate, not a
        high-water mark: the latest figure replaces the one before."""
        if what not in TIMES:
            raise ValueError(f"unknown time {what!r}; one of {', '.join(TIMES)}")
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"a time must be a finite number of seconds, not {seconds!r}")
        with self._mutex:
            self._times = {**self._times, model: {**self._times.get(model, {}), what: float(seconds)}}
            if self.path is not None:
                self._pending_times[(model, what)] = float(seconds)

    def record(self, model: str, measured_bytes: int, *, kind: str = "load") -> Footprint:
        """Merge one measurement (``kind``: "load" or "peak") and persist it now."""
        fp = self.note(model, measured_bytes, kind=kind)
        self.flush()
        return self._cache.get(model, fp)  # merged with what other processes wrote meanwhile

    def note(self, model: str, measured_bytes: int, *, kind: str = "load") -> Footprint:
        """Merge one measurement in memory at once (``get`` sees it); ``flush`` persists it.

        This does no file IO, so the orchestrator can call it on its event loop and flush
        from a worker thread.
        """
        if measured_bytes < 0:
            raise ValueError(f"a footprint cannot be negative ({measured_bytes} bytes)")
        with self._mutex:
            fp = _merge(self._cache.get(model), model, measured_bytes, kind)
            self._cache = {**self._cache, model: fp}
            if self.path is not None:  # in memory only: nothing to persist
                self._pending.append((model, measured_bytes, kind))
        return fp

    def flush(self) -> None:
        """Persist what was noted: read the file's latest content (another process may have
        learned meanwhile), merge the new measurements on top, replace it atomically."""
        with self._flushing, self._locked():
            with self._mutex:
                pending, self._pending = self._pending, []
                times, self._pending_times = self._pending_times, {}
            if (not pending and not times) or self.path is None:
                return  # in memory only: the cache already holds every measurement
            latest, latest_times = self._read()
            for model, measured, kind in pending:
                latest[model] = _merge(latest.get(model), model, measured, kind)
            for (model, what), seconds in times.items():
                latest_times.setdefault(model, {})[what] = seconds
            self._write(latest, latest_times)
            with self._mutex:
                # What was noted while this ran goes on top again (it is flushed next time).
                for model, measured, kind in self._pending:
                    latest[model] = _merge(latest.get(model), model, measured, kind)
                for (model, what), seconds in self._pending_times.items():
                    latest_times.setdefault(model, {})[what] = seconds
                self._cache, self._times = latest, latest_times

    @property
    def pending(self) -> int:
        """Measurements and times noted and not yet flushed."""
        return len(self._pending) + len(self._pending_times)

    def forget(self, model: str) -> None:
        self.flush()
        with self._flushing, self._locked():
            if self.path is not None:
                latest, latest_times = self._read()
            else:
                latest, latest_times = dict(self._cache), dict(self._times)
            latest.pop(model, None)
            latest_times.pop(model, None)
            if self.path is not None:
                self._write(latest, latest_times)
            self._cache, self._times = latest, latest_times

    # -- file handling -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self.path is None or fcntl is None:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(self.path.suffix + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _read(self) -> tuple[dict[str, Footprint], dict[str, dict[str, float]]]:
        """The file's footprints and times (a file without times, as older versions wrote:
        none)."""
        assert self.path is not None
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}, {}
        except OSError as exc:
            logger.warning(
                "cannot read learned footprints %s (%s); using the config's estimates", self.path, exc
            )
            return {}, {}
        try:
            raw = json.loads(text)
            if raw.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown format version {raw.get('version')!r}")
            out = {}
            for name, v in raw["models"].items():
                fp = Footprint(
                    model=str(name),
                    load_bytes=int(v["load_bytes"]),
                    peak_bytes=int(v["peak_bytes"]),
                    samples=int(v["samples"]),
                    updated=float(v["updated"]),
                )
                if fp.load_bytes < 0 or fp.peak_bytes < 0:
                    raise ValueError(f"negative bytes for {name!r}")
                out[fp.model] = fp
            times: dict[str, dict[str, float]] = {}
            for name, v in raw.get("times", {}).items():
                times[str(name)] = {}
                for what, seconds in v.items():
                    t = float(seconds)
                    if what not in TIMES or not math.isfinite(t) or t < 0:
                        raise ValueError(f"{name!r}: bad time {what}={seconds!r}")
                    times[str(name)][what] = t
            return out, times
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            aside = self.path.with_suffix(self.path.suffix + ".corrupt")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            logger.warning(
                "learned footprints %s are corrupt (%s); moved aside to %s, learning again",
                self.path,
                exc,
                aside,
            )
            return {}, {}

    def _write(self, data: Mapping[str, Footprint], times: Mapping[str, Mapping[str, float]]) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "version": FORMAT_VERSION,
            "models": {
                k: {f: v for f, v in asdict(fp).items() if f != "model"} for k, fp in sorted(data.items())
            },
            "times": {k: dict(sorted(v.items())) for k, v in sorted(times.items()) if v},
        }
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _merge(old: Footprint | None, model: str, measured_bytes: int, kind: str) -> Footprint:
    """One measurement on top of what was known: loads and peaks each keep their maximum."""
    load = measured_bytes if kind == "load" else (old.load_bytes if old else 0)
    if old is not None and kind == "load":
        load = max(old.load_bytes, measured_bytes)
    peak = max(measured_bytes, old.peak_bytes if old else 0)
    return Footprint(model, load, peak, (old.samples if old else 0) + 1, time.time())
