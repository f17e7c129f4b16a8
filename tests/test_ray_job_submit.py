"""The job as a `ray job submit` entrypoint against a local `ray start --head` cluster."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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
def cluster():
    """A head node on free ports with this virtualenv's python first on PATH; stopped afterwards."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    start = [str(BIN / "ray"), "start", "--head", f"--port={free_port()}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", "--disable-usage-stats"]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
    try:
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_annotate_runs_under_ray_job_submit(cluster, tmp_path):
    env, address = cluster
    out, index = tmp_path / "out", tmp_path / "index"
    cmd = [str(BIN / "ray"), "job", "submit", f"--address={address}", f"--working-dir={REPO}", "--",
           "python", "-m", "jobs.annotate", "--config", "conf/demo.yaml",
           f"output.path={out}", f"retrieval.index_dir={index}", "ray.progress_bars=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "succeeded" in log.lower(), log[-3000:]
    assert "done: 40 rows in 2 shard(s)" in log
    rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    expected = [r for p in sorted(DEMO_QUERIES.glob("*.parquet")) for r in pq.read_table(p).column("id").to_pylist()]
    assert sorted(r["id"] for r in rows) == sorted(expected)
    assert all(r["error"] is None and r["answer"] is not None for r in rows)
    assert (out / "_config.yaml").exists() and (out / "_manifest.json").exists()
