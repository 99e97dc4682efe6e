"""A simulated GPU: virtual VRAM with owner-tagged allocations.

It serves the property tests and the demo on machines without a GPU. It is strict in the
way a real device is: an allocation past the total raises ``SimulatedOOM``. Its peaks are
what the property tests check the budget against. Thread-safe (backends may allocate from
worker threads).

Its only sense of time is the slow release (``free(after_s=...)``), read from ``clock``:
``time.monotonic`` by default; the orchestrator that builds the device gives it its own clock,
so a run on a virtual clock releases memory in virtual time.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from orchestrator.device.base import DeviceOutOfMemory, DeviceReading, ProcessUse

FOREIGN_PREFIX = "foreign:"


class SimulatedOOM(DeviceOutOfMemory):
    """The simulated device's CUDA out-of-memory."""

    def __init__(self, owner: str, requested_bytes: int, free_bytes: int, *, limit: bool = False) -> None:
        super().__init__(owner, requested_bytes, free_bytes, limit=limit)
        self.args = (f"simulated CUDA {self.args[0]}",)


class SimulatedDevice:
    source = "simulated"

    def __init__(
        self, total_bytes: int, name: str = "simulated GPU", *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name
        self.clock = clock  # seconds, for slow releases; set by the orchestrator that builds it
        self.total_bytes = total_bytes
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self._releasing: list[tuple[float, str, int]] = []  # (deadline on self.clock, owner, bytes)
        self.peak_bytes = 0  # everything, foreign included
        self.peak_owned_bytes = 0  # everything but foreign processes

    # -- allocation ------------------------------------------------------------------------

    def allocate(self, owner: str, n_bytes: int) -> None:
        if n_bytes < 0:
            raise ValueError(f"cannot allocate a negative size ({n_bytes})")
        with self._lock:
            self._expire()
            used = sum(self._held.values()) + sum(n for _, _, n in self._releasing)
            if used + n_bytes > self.total_bytes:
                raise SimulatedOOM(owner, n_bytes, self.total_bytes - used)
            self._held[owner] = self._held.get(owner, 0) + n_bytes
            self._note_peaks()

    def shrink(self, owner: str, n_bytes: int) -> None:
        """Free part of what ``owner`` holds (a transient buffer)."""
        with self._lock:
            self._held[owner] = max(0, self._held.get(owner, 0) - n_bytes)
            if not self._held[owner]:
                del self._held[owner]

    def free(self, owner: str, *, after_s: float = 0.0) -> int:
        """Free what ``owner`` holds, now or (a slow release) ``after_s`` seconds later."""
        with self._lock:
            n = self._held.pop(owner, 0)
            if n and after_s > 0:
                # Still held (under a distinct tag) until the deadline, as a dying process's is.
                self._releasing.append((self.clock() + after_s, owner, n))
            return n

    def take_foreign(self, pid: int, n_bytes: int) -> None:
        """Another process (not ours) takes memory."""
        self.allocate(f"{FOREIGN_PREFIX}{pid}", n_bytes)

    def release_foreign(self, pid: int) -> int:
        return self.free(f"{FOREIGN_PREFIX}{pid}")

    # -- reading ---------------------------------------------------------------------------

    def used_bytes(self) -> int:
        with self._lock:
            self._expire()
            return sum(self._held.values()) + sum(n for _, _, n in self._releasing)

    def read(self) -> DeviceReading:
        """Foreign owners appear as their pids; our models as this process, as NVML shows them."""
        holders = self.holders()
        procs: dict[int, int] = {}
        for owner, n in holders.items():
            pid = int(owner[len(FOREIGN_PREFIX) :]) if owner.startswith(FOREIGN_PREFIX) else os.getpid()
            procs[pid] = procs.get(pid, 0) + n
        used = sum(holders.values())
        return DeviceReading(
            source=self.source,
            total_bytes=self.total_bytes,
            used_bytes=used,
            free_bytes=self.total_bytes - used,
            processes=tuple(ProcessUse(pid, n) for pid, n in sorted(procs.items())),
        )

    def free_bytes(self) -> int:
        return self.total_bytes - self.used_bytes()

    def held_by(self, owner: str, *, live_only: bool = False) -> int:
        with self._lock:
            self._expire()
            live = self._held.get(owner, 0)
            return live if live_only else live + sum(n for _, o, n in self._releasing if o == owner)

    def holders(self) -> dict[str, int]:
        with self._lock:
            self._expire()
            out = dict(self._held)
            for _, o, n in self._releasing:
                out[o] = out.get(o, 0) + n
            return out

    def owned_bytes(self) -> int:
        """Everything not held by foreign processes (our models, releasing ones included)."""
        return sum(n for o, n in self.holders().items() if not o.startswith(FOREIGN_PREFIX))

    def reset_peaks(self) -> None:
        with self._lock:
            self.peak_bytes = 0
            self.peak_owned_bytes = 0
            self._note_peaks()

    # -- internals (lock held) -------------------------------------------------------------

    def _expire(self) -> None:
        if self._releasing:
            now = self.clock()
            self._releasing = [r for r in self._releasing if r[0] > now]

    def _note_peaks(self) -> None:
        releasing = sum(n for _, _, n in self._releasing)
        total = sum(self._held.values()) + releasing
        owned = releasing + sum(n for o, n in self._held.items() if not o.startswith(FOREIGN_PREFIX))
        self.peak_bytes = max(self.peak_bytes, total)
        self.peak_owned_bytes = max(self.peak_owned_bytes, owned)
