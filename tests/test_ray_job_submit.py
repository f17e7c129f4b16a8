"""The job as a `ray job submit` entrypoint against a local `ray start --head` cluster (what is
tested is the submission: the working directory shipped, the driver on the cluster, its exit and
a second submission refused; the engine is the simulated one, the real engine has its own tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import DEMO_QUERIES, REPO

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path):
    """A head node on free ports with this virtualenv's python first on PATH; stopped afterwards.

    `ray start --block` in a session of its own, ended through its process group: `ray stop`
    would end every Ray on the machine, other test runs' included."""
    # Token authentication explicitly off for this local test cluster (bound to 127.0.0.1): with
    # RAY_AUTH_MODE unset, Ray 2.60's `ray start --head` turns it on whenever ~/.ray/auth_token
    # exists (any local ray.init() creates one), and the CLI client would then be refused.
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    address = f"http://127.0.0.1:{dashboard}"
    # Free ports for every listener with a fixed default (the agent's 52365, the client server's
    # 10001), so that another Ray on this machine cannot make the job agent fail to start.
    start = [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={free_port()}",
             f"--ray-client-server-port={free_port()}", "--disable-usage-stats"]
    log = tmp_path / "ray_start.log"
    with open(log, "wb") as out:
        head = subprocess.Popen(start, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=5)
                break
            except OSError:
                assert head.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(1)
        yield env, address
    finally:
        # A short grace period: `ray start --block` takes about 30 s to stop its processes one by
        # one on SIGTERM, and nothing of this throw-away cluster needs keeping.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def test_annotate_runs_under_ray_job_submit(cluster, tmp_path, simulated_engine):
    env, address = cluster
    out = tmp_path / "out"
    # A fixed submission id (as a nightly run's selfrag-<date>): Ray refuses a second job with it.
    submission_id = f"selfrag-test-{uuid.uuid4().hex[:12]}"

    def submit(*options: str) -> subprocess.CompletedProcess:
        cmd = [str(BIN / "ray"), "job", "submit", f"--address={address}", f"--submission-id={submission_id}",
               *options, f"--working-dir={REPO}", "--",
               "python", "-m", "jobs.annotate", "--config", "conf/demo.yaml",
               f"output.path={out}", "selfrag.mode=never", "selfrag.prompt_style=reference",
               *simulated_engine, "ray.progress_bars=false"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)

    proc = submit()
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "succeeded" in log.lower(), log[-3000:]
    assert f"Job '{submission_id}' submitted successfully" in log, log[-3000:]

    # The same submission id again (the same night submitted twice): refused at once, no second run.
    again = submit("--no-wait")
    refusal = again.stdout + again.stderr
    assert again.returncode != 0, refusal[-3000:]
    assert submission_id in refusal and "already exists" in refusal, refusal[-3000:]
    status = subprocess.run([str(BIN / "ray"), "job", "status", f"--address={address}", submission_id],
                            env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and f"Job '{submission_id}' succeeded" in status.stdout, status.stdout + status.stderr
    assert "done: 40 rows in 2 shard(s)" in log
    rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    expected = [r for p in sorted(DEMO_QUERIES.glob("*.parquet")) for r in pq.read_table(p).column("id").to_pylist()]
    assert sorted(r["id"] for r in rows) == sorted(expected)
    assert all(r["error"] is None and r["answer"] is not None for r in rows)
    assert (out / "_config.yaml").exists() and (out / "_manifest.json").exists()
