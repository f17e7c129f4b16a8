"""How a job ends early: its exit code and the one line it prints on standard error. The one
mapping every job's ``main`` uses (``end_job``):

- 2: refused before any work (``REFUSED``: a bad config, option, input, plan or output
  location, or an output another run holds); nothing is written to the output;
- 1: the run started but did not complete: ``IncompleteRun`` (shards not written),
  ``ServicesUnavailable`` (the services did not start), or any other error, whose traceback
  goes to the run log while the console gets one line;
- 128 + the signal's number: SIGINT or SIGTERM stopped it (``Interrupted``, or a bare
  ``KeyboardInterrupt``: SIGINT).

A ``KeyboardInterrupt`` that a stop raised (``pipeline.runtime.main_stop``) counts as its cause.
"""

from __future__ import annotations

import logging
import signal
import sys

from ..infra.config import ConfigError
from ..infra.console import no_space, printable
from ..evaluation.layouts import LayoutError
from ..export.source import ExportError
from ..infra.io import InputError
from ..output.lease import LeaseHeld
from .preflight import PreflightError
from ..runtime.main_stop import reason
from ..runtime.ray_connect import stop_ray
from ..report.write import ReportError
from ..services.deploy import ServicesUnavailable
from .errors import EvalError, IncompleteRun
from .signals import Interrupted

#: Refusals before any work: exit code 2.
REFUSED = (ConfigError, InputError, PreflightError, LeaseHeld, EvalError, LayoutError, ReportError, ExportError)
#: Ways of stopping that are expected: one line, no traceback in the log.
EXPECTED = (*REFUSED, IncompleteRun, ServicesUnavailable, Interrupted, KeyboardInterrupt)
#: Ways of stopping with no Ray to stop: refused before it started, or the run ended by itself.
RAY_LEFT = (*REFUSED, IncompleteRun)

log = logging.getLogger(__name__)


def failure_message(exc: BaseException, output: str) -> str:
    """The one line that says why a run failed after it started (a full disk, or anything else)."""
    full = no_space(exc)
    if full is not None:
        return (f"no space left on the device or quota holding {output} ({full}); the shards written "
                "are complete and marked done, nothing partial is visible: free space and run the same command "
                "again to resume")
    return (f"the run failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} "
            f"(the traceback is in the run log; shards written are complete: run the same command again to resume)")


def exit_status(exc: BaseException, output: str = "the output") -> tuple[int, str]:
    """(exit code, the line for standard error) of a job that ``exc`` ended; ``output``: the
    output location the job writes, named when the disk is full."""
    exc = reason(exc)
    if isinstance(exc, (Interrupted, KeyboardInterrupt)):
        signum = getattr(exc, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        return 128 + signum, (f"interrupted by {name}: shards already written are complete and marked done; "
                                  "run the same command again to resume (it skips them)")
    if isinstance(exc, REFUSED):
        return 2, f"error: {printable(exc)}"
    if isinstance(exc, (IncompleteRun, ServicesUnavailable)):
        return 1, f"error: {printable(exc)}"
    return 1, f"error: {printable(failure_message(exc, output))}"


def end_job(exc: BaseException, output: str = "the output") -> int:
    """Report ``exc``, which ended a job, and return the job's exit code (``exit_status``). An
    unexpected error's traceback goes to the log (the run log's file); the driver's Ray is
    stopped unless the job was refused or ended by itself (a local Ray goes down with every
    process of it, even one a signal caught inside ``ray.init``; on a cluster the job's actors
    end with its connection: ``pipeline.runtime.ray_connect.stop_ray``)."""
    exc = reason(exc)
    code, line = exit_status(exc, output)
    if not isinstance(exc, EXPECTED):
        log.info("the run failed", exc_info=exc)
    if not isinstance(exc, RAY_LEFT):
        stop_ray()
    print(line, file=sys.stderr, flush=True)
    return code
