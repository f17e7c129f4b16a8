"""The run's progress line and live bar (no Ray: a scripted row count)."""

from __future__ import annotations

import io
import threading

from pipeline.runtime.progress import Progress, bar, status


def test_status_and_bar_text():
    assert status(10, 40, 20.0) == "10/40 rows, 0.5 rows/s, ETA 1m00s"
    assert status(0, 40, 5.0) == "0/40 rows, 0 rows/s"  # no ETA before the first row
    assert status(40, 40, 80.0) == "40/40 rows, 0.5 rows/s"
    assert bar(10, 40, 20.0, width=8) == "[##------] 10/40 rows, 0.5 rows/s, ETA 1m00s"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Counts:
    """A scripted ``rows_done``: each call returns the next value (or raises); ``wait(n)``
    returns once it has been called ``n`` more times, i.e. the bar has been redrawn."""

    def __init__(self, values):
        self.values, self.calls, self.called = iter(values), 0, threading.Condition()

    def __call__(self) -> int:
        with self.called:
            self.calls += 1
            self.called.notify_all()
        value = next(self.values)
        if isinstance(value, Exception):
            raise value
        return value

    def wait(self, n: int) -> None:
        with self.called:
            target = self.calls + n
            assert self.called.wait_for(lambda: self.calls >= target, timeout=60)


def test_lines_go_above_a_live_bar_on_a_terminal_only():
    plain = io.StringIO()
    with Progress(40, lambda: 0, stream=plain) as shown:
        shown.line("wrote a\x1b[2J")
    assert plain.getvalue() == "wrote a?[2J\n"  # not a terminal: no bar, no control characters

    count = Counts(range(0, 1000, 5))
    term = Terminal()
    with Progress(40, count, every_s=0.02, stream=term) as shown:
        count.wait(10)  # past 40 rows: drawn capped at the total
        shown.line("wrote b", done=3)  # behind the count already drawn: the bar does not go back
        count.wait(2)
    out = term.getvalue()
    assert "\r\033[Kwrote b\n" in out
    assert "] 40/40 rows" in out and "/40 rows" in out.split("wrote b")[0]  # redrawn, capped at the total
    assert out.endswith("\r\033[K")  # the bar is cleared at the end


def test_a_failing_row_count_freezes_the_bar():
    count = Counts(TimeoutError("metrics actor busy") for _ in iter(int, 1))
    term = Terminal()
    with Progress(10, count, every_s=0.02, stream=term) as shown:
        count.wait(2)
        shown.line("wrote c", done=5)  # a written shard moves the bar on
        count.wait(2)
    out = term.getvalue()
    assert "0/10 rows" in out.split("wrote c")[0] and "5/10 rows" in out.split("wrote c")[1]
