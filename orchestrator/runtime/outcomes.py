"""What an executor action reports: how a switch ended (for the next decision) and what the
shutdown really did."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SwitchOutcome:
    """How a switch ended, for the next decision: the model it loaded, or the error its
    target's waiters get (neither when it found no room and simply waits)."""

    target: str
    loaded: bool = False
    error: Exception | None = None


@dataclass
class ShutdownReport:
    """What the shutdown really did: what was unloaded, and what could not be, and why."""

    unloaded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        done = f"unloaded {', '.join(self.unloaded)}" if self.unloaded else "nothing was resident"
        if not self.failed:
            return done
        why = "; ".join(f"{m}: {reason}" for m, reason in self.failed.items())
        return f"{done}; could not unload {', '.join(self.failed)} ({why})"
