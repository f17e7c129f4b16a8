"""The one mapping from how a job ended to its exit code and console line
(``pipeline.run.exit_codes``), and the jobs that use it."""

from __future__ import annotations

import errno
import logging
import signal

import pytest

from jobs.evaluate import main as evaluate_main
from pipeline.infra.config import ConfigError
from pipeline.export.source import ExportError
from pipeline.evaluation.layouts import LayoutError
from pipeline.infra.io import InputError
from pipeline.output.lease import LeaseHeld
from pipeline.run.preflight import PreflightError
from pipeline.report.write import ReportError
from pipeline.run import evaluate as evaluation_run
from pipeline.run import exit_codes
from pipeline.run.errors import EvalError, IncompleteRun
from pipeline.run.exit_codes import end_job, exit_status
from pipeline.run.signals import Interrupted
from pipeline.services.deploy import ServicesUnavailable


@pytest.fixture
def ray_stops(monkeypatch) -> list:
    stops: list = []
    monkeypatch.setattr(exit_codes, "stop_ray", lambda: stops.append(1))
    return stops


@pytest.mark.parametrize("exc", [ConfigError("bad key"), InputError("bad key"), PreflightError("bad key"),
                                 EvalError("bad key"), LayoutError("bad key"), ReportError("bad key"),
                                 ExportError("bad key")])
def test_refusals_exit_2_with_one_line_and_leave_ray_alone(exc, ray_stops, capsys):
    assert end_job(exc) == 2
    assert capsys.readouterr().err == "error: bad key\n" and not ray_stops


def test_an_output_held_by_another_run_is_a_refusal(ray_stops):
    code, line = exit_status(LeaseHeld("/out", {"run_id": "r1"}, 60))
    assert code == 2 and line.startswith("error: output /out is in use by another run: run id r1,")


def test_an_incomplete_run_exits_1_and_a_service_that_did_not_start_stops_ray(ray_stops, capsys):
    assert end_job(IncompleteRun("2 shard(s) were not completely annotated")) == 1 and not ray_stops
    assert end_job(ServicesUnavailable("selfrag-engine not running")) == 1 and ray_stops == [1]
    assert capsys.readouterr().err.splitlines() == ["error: 2 shard(s) were not completely annotated",
                                                    "error: selfrag-engine not running"]


def test_an_interrupt_exits_128_plus_the_signal(ray_stops):
    code, line = exit_status(Interrupted(signal.SIGTERM))
    assert code == 128 + signal.SIGTERM
    assert line == ("interrupted by SIGTERM: shards already written are complete and marked done; run the same "
                    "command again to resume (it skips them)")


def test_an_unexpected_error_is_one_line_with_its_traceback_in_the_log(ray_stops, capsys, caplog):
    with caplog.at_level(logging.INFO, logger=exit_codes.__name__):
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError as exc:
            assert end_job(exc, "/out") == 1
    assert capsys.readouterr().err == (
        "error: the run failed: RuntimeError: boom (the traceback is in the run log; shards written are "
        "complete: run the same command again to resume)\n")
    assert ray_stops == [1] and caplog.records[0].exc_info[0] is RuntimeError


def test_a_full_disk_names_the_output():
    code, line = exit_status(OSError(errno.ENOSPC, "No space left on device"), "s3://bucket/out")
    assert code == 1 and line.startswith("error: no space left on the device or quota holding s3://bucket/out "
                                         "(No space left on device)")


def test_the_evaluation_job_maps_its_outcomes_the_same_way(tmp_path, monkeypatch, capsys):
    assert evaluate_main(["--modes", "sometimes", "--workdir", str(tmp_path)]) == 2

    def fail(_path):
        raise RuntimeError("cannot read")

    monkeypatch.setattr(evaluation_run, "read_output", fail)
    assert evaluate_main(["--annotated", str(tmp_path / "out"), "--workdir", str(tmp_path)]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert err[0].startswith("error: --modes 'sometimes'")
    assert err[1].startswith("error: the run failed: RuntimeError: cannot read (the traceback is in the run log")


EXITING = """
import atexit, concurrent.futures, os, sys, threading, time
from pipeline.runtime.process_exit import exit_process

out, code = sys.argv[1], eval(sys.argv[2])

class Teardown:
    def __del__(self):
        open(os.path.join(out, "teardown"), "w").close()

kept = Teardown()  # alive at exit: only the interpreter's teardown would delete it

def work():
    time.sleep(0.5)  # still working when the main thread is done
    open(os.path.join(out, "thread"), "w").close()

threading.Thread(target=work).start()
pool = concurrent.futures.ThreadPoolExecutor(1)  # never shut down: its idle worker waits to be woken
pool.submit(int).result()
atexit.register(lambda: open(os.path.join(out, "atexit"), "w").write(str(os.path.exists(os.path.join(out, "thread")))))
print("summary", end="")  # a pipe buffers it
exit_process(code)
"""


@pytest.mark.parametrize("code, status, err", [("3", 3, ""), ("None", 0, ""), ("'no rows'", 1, "no rows\n")])
def test_a_job_process_ends_after_its_threads_and_atexit_handlers_and_skips_the_teardown(tmp_path, code, status, err):
    """``exit_process`` (every job's ``__main__``): the threads that are not daemons finish (an
    idle thread pool's worker woken, as the interpreter does), then the ``atexit`` handlers run,
    the buffered output is written, and the process ends with the code as ``sys.exit`` reads it,
    without the interpreter's teardown of the objects still alive (2.2 s of a small job)."""
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, "-c", EXITING, str(tmp_path), code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (status, "summary", err)
    assert (tmp_path / "atexit").read_text() == "True"  # the thread had finished
    assert not (tmp_path / "teardown").exists()
