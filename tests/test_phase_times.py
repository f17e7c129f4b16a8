"""The manifest's phases: seconds since the process started, in run order, reset per run."""

from __future__ import annotations

import pytest

from pipeline.runtime import phase_times


def test_phases_count_from_the_process_start_in_run_order(monkeypatch):
    monkeypatch.setattr(phase_times, "_marks", {})
    monkeypatch.setattr(phase_times, "process_start", lambda: 100.0)
    phase_times.mark("exit", at=130.0)  # marked out of order: reported in run order
    phase_times.mark("imports", at=101.5)
    phase_times.mark("preflight", at=105.25)
    assert phase_times.relative() == {"imports": 1.5, "preflight": 5.25, "exit": 30.0}
    assert list(phase_times.relative()) == ["imports", "preflight", "exit"]
    phase_times.start_run()  # a second run in this process keeps only the interpreter's imports
    assert phase_times.relative() == {"imports": 1.5}
    with pytest.raises(AssertionError):
        phase_times.mark("warmup")


def test_the_process_start_is_this_process_creation_time():
    import time

    import psutil

    assert phase_times.process_start() == psutil.Process().create_time() <= time.time()
