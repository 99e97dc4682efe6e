"""Event records: one per machine transition and per executor step, lease and fault.

Listeners are sync callables (cheap: they run inline, under no lock, and must not block);
``EventHub.subscribe()`` gives an async iterator for in-process subscribers.
"""

from __future__ import annotations

import logging
import math
import operator
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream

logger = logging.getLogger("orchestrator.events")


@dataclass(frozen=True)
class Event:
    time_s: float  # seconds since the orchestrator started
    # "transition", "evict", "load", "adopt" (a model its program holds, taken over in place),
    # "grant", "release", "fail", "timeout", "cancel", "crash", "resize", "learn", and for
    # external reservations "external_end", "external_overuse" (the daemon adds its own:
    # "lease_expired")
    kind: str
    model: str | None = None
    trigger: str | None = None
    from_state: str | None = None
    to_state: str | None = None
    bytes_before: int | None = None  # committed bytes in the ledger before
    bytes_after: int | None = None
    duration_s: float | None = None
    detail: str | None = None
    committed_bytes: int | None = None  # the ledger's committed bytes when the event happened
    budget_bytes: int | None = None  # the ledger's budget then
    gpu: int | None = None  # the card (on a machine with several; the two above are its own)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


_EVENT_FIELDS = operator.attrgetter(*(f.name for f in fields(Event)))  # an event as a tuple


class EventHub:
    def __init__(self, history: int = 10_000) -> None:
        # The latest events, as plain tuples: a tuple of strings and numbers is one the garbage
        # collector stops tracking, and a daemon keeps 10,000 of them, two per proxied request
        # (as Event objects they were half of what every full collection had to scan).
        self._history: deque[tuple[Any, ...]] = deque(maxlen=history)
        self._listeners: list[Callable[[Event], None]] = []
        self._streams: list[MemoryObjectSendStream[Event]] = []
        self.dropped = 0

    def add_listener(self, fn: Callable[[Event], None]) -> Callable[[], None]:
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    @property
    def history(self) -> list[Event]:
        """The latest events (at most ``history`` of them), oldest first."""
        return [Event(*t) for t in self._history]

    def emit(self, event: Event) -> None:
        self._history.append(_EVENT_FIELDS(event))
        for fn in list(self._listeners):
            try:
                fn(event)
            except Exception:
                logger.exception("event listener %r failed; it stays subscribed", fn)
        for s in list(self._streams):
            try:
                s.send_nowait(event)
            except anyio.WouldBlock:
                self.dropped += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._streams.remove(s)

    @property
    def subscribers(self) -> int:
        """How many ``subscribe()`` iterators are open."""
        return len(self._streams)

    def subscribe(self, buffer: int = 1000) -> AsyncIterator[Event]:
        """Subscribe now (not at the first ``__anext__``): no event after this call is missed
        unless ``buffer`` events pile up unread (then they are counted in ``dropped``)."""
        send, receive = anyio.create_memory_object_stream[Event](max_buffer_size=buffer or math.inf)
        self._streams.append(send)

        def unsubscribe() -> None:
            if send in self._streams:
                self._streams.remove(send)
            send.close()
            receive.close()

        async def iterate() -> AsyncIterator[Event]:
            try:
                async for event in receive:
                    yield event
            finally:
                unsubscribe()

        it = iterate()
        # An iterator that is dropped without being read (or finished) unsubscribes too.
        weakref.finalize(it, unsubscribe)
        return it
