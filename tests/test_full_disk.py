"""A full disk under the output: one ``error:`` line (no traceback), no partial file left, and
the same command completes the run once there is space (real Ray, the simulated engine answering
from a real run's recording, the output on a small tmpfs mounted by the test; needs root, as
the suite has on its machines)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DEMO_QUERIES, REPO, RUN_MARK, marked_processes, wait_until_gone

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path):
    """tmp_path/out: a 256 KiB tmpfs, unmounted afterwards."""
    out = tmp_path / "out"
    out.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(out)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.fail(f"this test mounts a tmpfs and needs root: {mounted.stderr.strip()}")
    yield out
    busy = subprocess.run(["umount", str(out)], capture_output=True, text=True)
    if busy.returncode != 0:  # detach it anyway (no mount outlives the suite), and say so
        subprocess.run(["umount", "-l", str(out)], check=True)
        pytest.fail(f"the output's tmpfs was busy after the job's processes were gone: {busy.stderr.strip()}")


def annotate(inputs, out, engine: list[str]) -> subprocess.CompletedProcess:
    """The job, and then every process it started gone (Ray's workers may still hold files on
    the small disk a moment after the driver exits)."""
    mark = uuid.uuid4().hex
    env = dict(os.environ, **{RUN_MARK: mark})
    env.pop("RAY_ADDRESS", None)
    try:
        return subprocess.run([sys.executable, "-m", "jobs.annotate", f"input.paths={inputs}", f"output.path={out}",
                               "selfrag.mode=never", "engine.simulated.step_s=0.001", *engine],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    finally:  # the job has exited (or timed out): whatever it left is ended, then awaited
        for p in marked_processes(mark):
            p.kill()
        wait_until_gone(mark)


def test_a_full_disk_is_one_line_and_the_rerun_completes(tmp_path, small_disk, simulated_engine):
    (tmp_path / "in").mkdir()
    rows = 100  # about 600 KB of incompressible text: more than the disk holds
    demo = pa.concat_tables([pq.read_table(p) for p in sorted(DEMO_QUERIES.glob("*.parquet"))]).drop(["id"])
    questions = demo.take([i % demo.num_rows for i in range(rows)])  # the questions the engine's recording has
    pq.write_table(questions.append_column("blob", pa.array([os.urandom(3000).hex() for _ in range(rows)])),
                   tmp_path / "in" / "q.parquet")
    first = annotate(tmp_path / "in", small_disk, simulated_engine)
    assert first.returncode == 1, first.stderr[-3000:]
    errors = [ln for ln in first.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == [f"error: no space left on the device or quota holding {small_disk} (No space left on device); "
                      "the shards written are complete and marked done, nothing partial is visible: free space and "
                      "run the same command again to resume"], first.stderr[-3000:]
    assert "Traceback" not in first.stderr and len(first.stderr.splitlines()) <= 3, first.stderr[-3000:]
    left = sorted(str(p.relative_to(small_disk)) for p in small_disk.rglob("*") if p.is_file())
    assert not [name for name in left if name.endswith((".parquet", ".tmp"))], left  # nothing partial, no temporaries
    assert not (small_disk / "_done").exists() or not list((small_disk / "_done").iterdir())

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    second = annotate(tmp_path / "in", small_disk, simulated_engine)
    assert second.returncode == 0, second.stderr[-3000:]
    written = pq.read_table(small_disk / "q.parquet")
    assert written.num_rows == rows and written.column("error").null_count == rows
    assert (small_disk / "_done" / "q.json").exists()
