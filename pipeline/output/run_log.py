"""Where a run's logs go: a quiet console by default, everything else in a log file.

With ``log_level: info`` (the default) the console gets the job's own lines (one per finished
shard, the summary, warnings and errors, each in one line). Everything else goes to a log file
that is copied to ``{output}/_logs/`` when the run ends: Python logging at INFO (the job's
modules, Ray Data, Ray Serve), the lines Ray workers print (Serve replicas, vLLM, stage actors),
and what native code writes to the process's standard error (Ray's C++ core worker, and the Ray
processes this driver starts). ``log_level: debug`` leaves all of it on the console as well.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time

from ..infra.console import printable
from ..infra.io import make_parent, replacing
from .folder import OutputFolder

#: Top-level packages whose warnings the console shows.
OWN = ("pipeline", "jobs", "__main__")
#: Library loggers whose INFO lines are progress chatter, kept for the file.
CHATTY = ("ray", "ray.data", "ray.serve", "vllm", "filelock", "urllib3", "botocore", "s3fs", "fsspec", "httpx")


_active: "RunLog | None" = None


class OneLine(logging.Formatter):
    """``warning: message`` (a traceback, if any, stays in the file)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {printable(record.getMessage())}"


def quiet() -> bool:
    """Whether a run log keeps library output off the console now."""
    return _active is not None and not _active.debug


def quiet_libraries() -> None:
    """Library loggers lose their own console handlers and log through the root logger (the
    file). Ray, Ray Data and Ray Serve add such handlers when they start, so the job calls this
    again once they have."""
    if not quiet():
        return
    for name in CHATTY:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True


def capture_workers() -> None:
    """After ``ray.init``: the active run log (if any) takes the lines Ray workers print."""
    if _active is not None:
        _active.capture_workers()
        quiet_libraries()


class RunLog:
    """The log of one driver process; ``start`` before Ray starts, ``close`` at the end (which
    restores the process's logging and standard error as they were)."""

    def __init__(self, level: str = "info"):
        self.debug = level == "debug"
        handle, self.path = tempfile.mkstemp(prefix="selfrag-run-", suffix=".log")
        self.file = os.fdopen(handle, "a", buffering=1, encoding="utf-8", errors="replace")
        self._saved_fd: int | None = None
        self._saved_stderr = sys.stderr
        self._saved_root: tuple[int, list] | None = None
        self._ray_print = None

    def start(self) -> None:
        """Send Python logging (and, unless debug, native standard error) to the log file."""
        global _active
        _active = self
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        root = logging.getLogger()
        self._saved_root = (root.level, list(root.handlers))
        root.setLevel(logging.DEBUG if self.debug else logging.INFO)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        to_file = logging.StreamHandler(self.file)
        to_file.setFormatter(fmt)
        root.addHandler(to_file)
        if self.debug:
            console = logging.StreamHandler(sys.stderr)
            console.setFormatter(fmt)
            root.addHandler(console)
            return
        import ray.data  # noqa: F401 - both configure their loggers when imported: import, then quiet them
        import ray.serve  # noqa: F401

        quiet_libraries()
        logging.captureWarnings(True)  # libraries' warnings (a run in one process imports vLLM here) go to the file
        sys.stdout.flush()
        sys.stderr.flush()
        # Native code writes to file descriptor 2, which now goes to the file; Python's
        # sys.stderr keeps the console (a stream of its own when it was file descriptor 2).
        try:
            on_fd2 = sys.stderr.fileno() == 2
        except (AttributeError, OSError, ValueError):  # already redirected (e.g. captured by a test)
            on_fd2 = False
        self._saved_fd = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        if on_fd2:
            sys.stderr = os.fdopen(os.dup(self._saved_fd), "w", buffering=1, encoding="utf-8", errors="replace")
        console = logging.StreamHandler(sys.stderr)  # the job's own warnings, and any error, in one line
        console.setLevel(logging.WARNING)
        # Only the job's own records: a library's error record is in the file, and the job's own
        # error line says what it meant for the run.
        console.addFilter(lambda r: r.name.split(".")[0] in OWN)
        console.setFormatter(OneLine())
        root.addHandler(console)

    def capture_workers(self) -> None:
        """After ``ray.init``: the lines Ray workers print go to the file (and, with debug, to
        the console as Ray prints them)."""
        from ray._private import worker

        if not self.debug:
            worker.global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
            # The raylet's messages to the driver (a worker died, a task failed) are printed by
            # Ray's error listener through this function, not through the dispatcher.
            if self._ray_print is None:
                self._ray_print = worker.print_to_stdstream
                worker.print_to_stdstream = lambda data, ignore_prefix=False: self._worker_lines(data)
        worker.global_worker_stdstream_dispatcher.add_handler("selfrag_run_log", self._worker_lines)

    def _worker_lines(self, data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ("raylet" if data.get("pid") == "raylet" else "")
        for line in data.get("lines") or []:
            self.file.write(f"({who} pid={data.get('pid')}) {line}\n")

    def _restore(self) -> None:
        if "ray._private.worker" in sys.modules:
            worker = sys.modules["ray._private.worker"]
            worker.global_worker_stdstream_dispatcher.remove_handler("selfrag_run_log")
            if self._ray_print is not None:
                worker.print_to_stdstream, self._ray_print = self._ray_print, None
        if self._saved_fd is not None:
            sys.stderr.flush()
            os.dup2(self._saved_fd, 2)
            os.close(self._saved_fd)
            self._saved_fd = None
            if sys.stderr is not self._saved_stderr:
                sys.stderr.close()
                sys.stderr = self._saved_stderr
        logging.captureWarnings(False)
        if self._saved_root is not None:
            root = logging.getLogger()
            for handler in list(root.handlers):
                root.removeHandler(handler)
            level, handlers = self._saved_root
            root.setLevel(level)
            for handler in handlers:
                root.addHandler(handler)
            self._saved_root = None

    def close(self, output: OutputFolder | None, run_id: str | None = None) -> str | None:
        """Restore logging and standard error, and copy the log to ``{output}/_logs/``; returns
        its location there (None when there is no output or the copy failed, with a warning)."""
        global _active
        _active = None
        self._restore()
        self.file.close()
        if not output:
            os.remove(self.path)
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = output.log_file(f"run-{stamp}-{run_id}.log" if run_id else f"run-{stamp}.log")
        try:
            fs, path = output.storage.filesystem(dest)
            make_parent(fs, path)
            with replacing(fs, path) as tmp:  # no partial log when the disk is full
                fs.put_file(self.path, tmp)
        except Exception as exc:  # noqa: BLE001 - the run's outcome does not depend on its log
            print(f"warning: the run log stays at {self.path} ({type(exc).__name__}: {exc})", file=sys.stderr)
            return None
        os.remove(self.path)
        return dest
