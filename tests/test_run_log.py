"""The run log keeps the console quiet: Ray's messages and library errors go to the file, the
job's own lines stay on the console in one printable line each (no Ray cluster needed)."""

from __future__ import annotations

import contextlib
import io
import logging
import sys

from pipeline.output.run_log import RunLog


@contextlib.contextmanager
def started(console: io.StringIO):
    """A run log from start to close with ``console`` as standard output and error, all within
    one test phase (pytest swaps its logging handlers and standard streams between phases, and
    the run log restores what it found)."""
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = console
    log = RunLog("info")
    log.start()
    log.capture_workers()
    try:
        yield log
    finally:
        log.close(None)
        sys.stdout, sys.stderr = saved


def logged(log: RunLog) -> str:
    log.file.flush()
    with open(log.path, encoding="utf-8") as f:
        return f.read()


def test_the_raylets_messages_go_to_the_file_not_the_console():
    from ray._private import worker

    console = io.StringIO()
    with started(console) as run_log:
        # what Ray's error listener does when a worker dies or a task fails
        worker.print_to_stdstream({"lines": ["A worker died or was killed while executing a task"], "pid": "raylet",
                                   "is_err": False}, ignore_prefix=False)
        assert "(raylet pid=raylet) A worker died or was killed while executing a task" in logged(run_log)
    assert "worker died" not in console.getvalue()


def test_ray_prints_again_once_the_log_is_closed():
    from ray._private import worker

    original = worker.print_to_stdstream
    log = RunLog("info")
    log.start()
    log.capture_workers()
    assert worker.print_to_stdstream is not original
    log.close(None)
    assert worker.print_to_stdstream is original


def test_library_errors_stay_in_the_file_and_own_warnings_are_one_printable_line():
    console = io.StringIO()
    with started(console) as run_log:
        logging.getLogger("ray.data").error("Exception occurred in user code\nTraceback ...")
        logging.getLogger("pipeline.output.lease").warning("lease heartbeat for %s failed", "out/\x1b[2Jx")
        assert "Exception occurred in user code" in logged(run_log)
    assert console.getvalue() == "warning: lease heartbeat for out/?[2Jx failed\n"
