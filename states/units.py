"""Byte arithmetic. Bytes (int) inside, GiB only in messages."""

from __future__ import annotations

MIB = 1024**2
GIB = 1024**3


def gib_to_bytes(gib: float) -> int:
    """Convert a GiB figure (as written in configs and the Model Management Module) to bytes."""
    return round(gib * GIB)


def format_gib(n_bytes: int | float) -> str:
    """Format a byte count for a message: ``format_gib(11.5 * GIB) == "11.50 GiB"``."""
    return f"{n_bytes / GIB:.2f} GiB"
