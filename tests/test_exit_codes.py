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
