"""The device protocol: read VRAM, attributed to owners. Sync and cheap (NVML: ~10 us)."""

from __future__ import annotations

from typing import Protocol


class Device(Protocol):
    name: str
    source: str  # where the numbers come from, e.g. "simulated", "nvml"
    total_bytes: int

    def used_bytes(self) -> int:
        """Bytes in use on the whole device, by anyone."""
        ...

    def held_by(self, owner: str, *, live_only: bool = False) -> int:
        """Bytes held on behalf of ``owner`` (a model name) now.

        ``live_only`` leaves out memory that is on its way back (a process that is exiting,
        a slow release): that memory belongs to nobody the ledger knows, and counts as
        foreign until it is gone.
        """
        ...
