"""A status line redrawn in the background (spinner, countdown) while the main thread
blocks in a long-poll, and a stdin reader that lets the user interrupt a wait with Enter."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TextIO

from client_sdk.cli._common import Output

Render = Callable[[int], str]


class Ticker:
    """Calls `render(tick)` every `interval` seconds and shows it as the status line."""

    def __init__(self, out: Output, render: Render, interval: float = 0.2) -> None:
        self._out = out
        self._render = render
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Ticker:
        if self._out.interactive and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pns-ticker", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            self._out.status(self._render(tick))
            tick += 1
            self._stop.wait(self._interval)

    def stop(self) -> None:
        if self._thread is not None and not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self._out.end_status()

    def __enter__(self) -> Ticker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LineReader:
    """Reads stdin lines on a daemon thread, so a blocking wait can be interrupted.

    The first line sets `interrupted`; every line is also kept for `next_line`, so a code
    typed straight away (instead of a bare Enter) is not lost. End of input is not an
    interruption: a script with no stdin simply waits for the phone."""

    def __init__(self, stream: TextIO, interrupted: threading.Event) -> None:
        self._stream = stream
        self._interrupted = interrupted
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pns-stdin", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            for line in self._stream:
                self._lines.put(line.strip())
                self._interrupted.set()
        except (OSError, ValueError):
            pass  # no usable stdin (closed, or captured by a test runner)
        self._lines.put(None)

    def next_line(self) -> str | None:
        """The next line typed, or None at end of input."""
        self.start()
        line = self._lines.get()
        if line is None:
            self._lines.put(None)  # stay at end of input for later calls
        return line
