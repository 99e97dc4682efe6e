"""Errors of the pure core.

The hierarchy (the orchestrator adds its own below ``OrchestratorError``)::

    RuntimeError
     └── OrchestratorError            every error this project raises
          ├── IllegalTransition       a trigger the state machine does not allow now
          ├── InsufficientVRAM        a model cannot fit in the budget
          └── LeaseDeadlock           a task waits for a model that its own lease keeps out

``OrchestratorError`` derives from ``RuntimeError`` because the Model Management Module's users
catch ``RuntimeError`` around VRAM checks. Each error keeps its facts as attributes and
builds a message that says what is wrong and what to do.
"""

from __future__ import annotations

from states.units import format_gib


class OrchestratorError(RuntimeError):
    """Base of every error raised by vram-orchestrator."""


class IllegalTransition(OrchestratorError):
    """A trigger was fired in a state whose table has no transition for it.

    The machine's state is unchanged when this is raised.
    """

    def __init__(self, trigger: str, state: str) -> None:
        self.trigger = trigger
        self.state = state
        super().__init__(f"can't handle {trigger} when state={state}")


class InsufficientVRAM(OrchestratorError):
    """A model needs more VRAM than can be made free for it.

    :param model: the model's name (or a description such as "SDXL+ControlNet")
    :param required_bytes: what the model needs
    :param free_bytes: what is (or could be made) free for it
    :param budget_bytes: the whole budget
    :param reason: why the room is missing, when it is not simply the budget
    """

    def __init__(
        self,
        model: str,
        required_bytes: int,
        free_bytes: int,
        budget_bytes: int,
        *,
        reason: str = "",
        advice: str = "",
    ) -> None:
        self.model = model
        self.required_bytes = required_bytes
        self.free_bytes = free_bytes
        self.budget_bytes = budget_bytes
        self.shortfall_bytes = max(0, required_bytes - free_bytes)
        self.reason = reason
        if not advice:
            if required_bytes > budget_bytes:
                advice = (
                    "lower the model's vram_gb estimate if it is wrong, use a smaller "
                    "variant, or raise hardware.safe_max_vram_gb"
                )
            else:
                advice = "unload a model or wait for other processes to free memory"
        msg = (
            f"cannot load {model!r}: needs {format_gib(required_bytes)} but only "
            f"{format_gib(free_bytes)} of the {format_gib(budget_bytes)} budget "
            f"can be free (short {format_gib(self.shortfall_bytes)})"
        )
        if reason:
            msg += f"; {reason}"
        super().__init__(f"{msg}; {advice}")


class LeaseDeadlock(OrchestratorError):
    """A task waits for a model that needs a model evicted on which the same task holds a
    lease: it would wait forever (the decision fails it at once)."""

    def __init__(self, model: str, held: str) -> None:
        self.model, self.held = model, held
        super().__init__(
            f"this task waits for {model!r}, which needs {held!r} evicted, but this same task "
            f"holds a lease on {held!r}; leave the `async with acquire({held!r})` block first"
        )
