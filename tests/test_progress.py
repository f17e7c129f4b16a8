"""The run's progress line and live bar (no Ray: a scripted row count)."""

from __future__ import annotations

import io
import time

from pipeline.runtime.progress import Progress, bar, status


def test_status_and_bar_text():
    assert status(10, 40, 20.0) == "10/40 rows, 0.5 rows/s, ETA 1m00s"
    assert status(0, 40, 5.0) == "0/40 rows, 0 rows/s"  # no ETA before the first row
    assert status(40, 40, 80.0) == "40/40 rows, 0.5 rows/s"
    assert bar(10, 40, 20.0, width=8) == "[##------] 10/40 rows, 0.5 rows/s, ETA 1m00s"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_go_above_a_live_bar_on_a_terminal_only():
    plain = io.StringIO()
    with Progress(40, lambda: 0, stream=plain) as shown:
        shown.line("wrote a\x1b[2J")
    assert plain.getvalue() == "wrote a?[2J\n"  # not a terminal: no bar, no control characters

    count = iter(range(0, 1000, 5))
    term = Terminal()
    with Progress(40, lambda: next(count), every_s=0.02, stream=term) as shown:
        time.sleep(0.3)
        shown.line("wrote b", done=3)  # behind the count already drawn: the bar does not go back
        time.sleep(0.1)
    out = term.getvalue()
    assert "\r\033[Kwrote b\n" in out
    assert "] 40/40 rows" in out and "/40 rows" in out.split("wrote b")[0]  # redrawn, capped at the total
    assert out.endswith("\r\033[K")  # the bar is cleared at the end


def test_a_failing_row_count_freezes_the_bar():
    def broken() -> int:
        raise TimeoutError("metrics actor busy")
    term = Terminal()
    with Progress(10, broken, every_s=0.02, stream=term) as shown:
        time.sleep(0.1)
        shown.line("wrote c", done=5)  # a written shard moves the bar on
        time.sleep(0.1)
    out = term.getvalue()
    assert "0/10 rows" in out.split("wrote c")[0] and "5/10 rows" in out.split("wrote c")[1]
