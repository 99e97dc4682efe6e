"""A status line on a terminal for long first-run work (building the tiny models, a slow
switch in the demo): one line rewritten in place, quiet when the output is not a terminal."""

from __future__ import annotations

import threading
import time
from typing import TextIO


class StatusLine:
    """One line on a terminal rewritten in place (carriage return), for long waits.

    Quiet when ``stream`` is not a terminal (a pipe, a file, a test's buffer): the lines that
    matter are printed anyway (``print``); the status line only shows that something is still
    happening. Safe to use from two threads.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        isatty = getattr(stream, "isatty", None)
        self.enabled = bool(isatty and isatty())
        self._shown = 0  # characters on the status line now
        self._lock = threading.Lock()

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.stream.write("\r" + text + " " * max(0, self._shown - len(text)))
            self.stream.flush()
            self._shown = len(text)

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def print(self, text: str) -> None:
        """A line of output that stays (the status line, if any, is cleared first)."""
        with self._lock:
            self._clear()
            print(text, file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.enabled and self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0


class Ticker:
    """Shows how long the current step has run on a ``StatusLine``, refreshed four times a
    second by a background thread, once it has run ``after_s``; on a non-terminal it does
    nothing. Use it as a context manager around the work."""

    def __init__(self, line: StatusLine) -> None:
        self.line = line
        self._what: str | None = None
        self._since = 0.0
        self._after_s = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Ticker:
        if self.line.enabled:
            self._thread = threading.Thread(target=self._run, name="vram-demo-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.done()

    def step(self, what: str, *, after_s: float = 0.0) -> None:
        with self._lock:
            self._what, self._since, self._after_s = what, time.monotonic(), after_s
        self._render()

    def done(self) -> None:
        with self._lock:
            self._what = None
            self.line.clear()

    def _render(self) -> None:
        with self._lock:
            elapsed = time.monotonic() - self._since
            if self._what is not None and elapsed >= self._after_s:
                self.line.show(f"  {self._what} ... {elapsed:.1f} s")

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self._render()
