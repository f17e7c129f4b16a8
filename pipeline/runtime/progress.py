"""The run's progress on the console: a line per finished shard, and on a terminal one live bar
(rows done / total, rows/s, ETA) redrawn from the writer's row count in the metrics actor."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import Callable

from ..infra.console import printable


def eta(seconds: float) -> str:
    """``1m05s``."""
    s = int(seconds)
    return f"{s // 60}m{s % 60:02d}s"


def status(done: int, total: int, seconds: float) -> str:
    """``15/40 rows, 0.41 rows/s, ETA 1m01s`` (no ETA before the first row or after the last)."""
    rate = done / seconds if seconds > 0 else 0.0
    left = (total - done) / rate if rate and done < total else 0
    return f"{done}/{total} rows, {rate:.3g} rows/s" + (f", ETA {eta(left)}" if left else "")


def bar(done: int, total: int, seconds: float, width: int = 30) -> str:
    """``[#########---------------------] 15/40 rows, 0.41 rows/s, ETA 1m01s``."""
    filled = int(width * done / total) if total else width
    return f"[{'#' * filled}{'-' * (width - filled)}] {status(done, total, seconds)}"


class Progress:
    """Prints shard lines; on a terminal also keeps a bar on the last line, redrawn every
    ``every_s`` seconds from ``rows_done()`` (which may fail: the bar then keeps its last value)."""

    def __init__(self, total: int, rows_done: Callable[[], int], every_s: float = 1.0, stream=None):
        self.total, self.rows_done, self.every_s = total, rows_done, every_s
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.start, self.done = time.time(), 0
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="selfrag-progress", daemon=True)

    def __enter__(self) -> "Progress":
        if self.live:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.live:
            self._thread.join(timeout=5)
            with self._lock:
                self.stream.write("\r\033[K")
                self.stream.flush()

    def status(self, done: int) -> str:
        """``status`` of ``done`` rows since this progress started."""
        return status(done, self.total, time.time() - self.start)

    def line(self, text: str, done: int | None = None) -> None:
        """Print a line above the bar; ``done``: rows known done now (the bar never goes back)."""
        with self._lock:
            if done is not None:
                self.done = min(max(done, self.done), self.total)
            text = printable(text)  # e.g. a shard named with escapes
            self.stream.write(("\r\033[K" if self.live else "") + text + "\n")
            self._draw()

    def _draw(self) -> None:
        if self.live:
            width = max(10, min(30, shutil.get_terminal_size().columns - 60))
            self.stream.write("\r\033[K" + bar(self.done, self.total, time.time() - self.start, width))
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                counted = self.rows_done()
            except Exception:  # noqa: BLE001 - a slow or lost metrics actor only freezes the bar
                counted = 0
            with self._lock:
                self.done = min(max(counted, self.done), self.total)
                self._draw()
