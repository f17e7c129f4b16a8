"""Node loss on a local multi-node Ray cluster (a head with no CPUs for tasks, worker nodes on
this machine; the engine replica is the simulated one, answering from a real run's recording at
about 1 s per answer), in two arranged cases, each with one expected outcome:

- the node of the engine replica is lost mid-run: Serve replaces the replica on a new node,
  the calls are retried, and the run completes (exit 0) with every row exactly once;
- the node of the writer is lost while the writer holds rows it has not staged: those rows
  are gone, so the run fails with one clear line (exit 1), and a rescaled rerun resumes to
  every row exactly once.

Where each actor runs is arranged with resources, not left to the scheduler: the engine
replica asks for 2 CPUs, so it can only start on the 2-CPU node, and takes all of it; the job's
Ray Data tasks and actors (0.1 CPU each) then all run on the 1-CPU node. The moment of the loss
is an event, never a sleep: a shard written, or the writer held at the commit of its first
shard by the test hook (``pipeline.runtime.phases``), armed on the writer's node only.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DEMO_QUERIES, REPO
from pipeline.run.dataflow import BLOCK_BYTES
from pipeline.runtime.phases import PAUSE_AT, PAUSED_FILE

pytestmark = pytest.mark.integration

#: The engine replica's CPUs: only a node with that many free can host it.
ENGINE_CPUS = 2
#: A worker node's object store (small: the cluster shares this machine).
STORE = 200 << 20


@pytest.fixture
def cluster():
    """A head that runs only the driver's bookkeeping (no CPUs for tasks); tests add workers."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": STORE})
    try:
        yield cluster
    finally:
        cluster.shutdown()


def add_worker(cluster, cpus: int, env: dict | None = None):
    """A worker node with ``cpus`` CPUs (``env``: for its raylet and the workers it starts)."""
    node = cluster.add_node(num_cpus=cpus, object_store_memory=STORE, **({"env_vars": env} if env else {}))
    cluster.wait_for_nodes()
    return node


def job(address: str, *overrides: str) -> tuple[subprocess.Popen, queue.Queue, threading.Thread]:
    """The annotation job as a driver of the cluster; its output lines arrive on the queue."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.annotate", f"ray.address={address}",
                             "ray.progress_bars=false", *overrides], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True)
    reader.start()
    return proc, lines, reader


def wait_for_line(proc: subprocess.Popen, lines: queue.Queue, reader: threading.Thread, prefix: str,
                  timeout: float = 600) -> list[str]:
    """Wait for the job to print a line starting with ``prefix``; the lines so far. Fails if
    the job ends first."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert reader.is_alive(), f"the job ended ({proc.poll()}) first:\n{''.join(seen)[-4000:]}"
            continue
        seen.append(line)
        if line.startswith(prefix):
            return seen
    raise AssertionError(f"no line {prefix!r} in {timeout} s:\n{''.join(seen)[-4000:]}")


def wait_for_pause(proc: subprocess.Popen, lines: queue.Queue, paused: Path, phase: str, timeout: float = 600) -> int:
    """Wait until a process announces (in ``paused``) that the test hook holds it at ``phase``; its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = [ln.split() for ln in (paused.read_text().splitlines() if paused.exists() else [])]
        if held:
            assert held[0][0] == phase, held
            return int(held[0][1])
        assert proc.poll() is None, f"the job exited {proc.returncode} before the pause:\n{rest(lines)[-4000:]}"
        time.sleep(0.2)  # polling a marker file; the outcome does not depend on this interval
    raise AssertionError(f"nothing paused at {phase} in {timeout} s:\n{rest(lines)[-4000:]}")


def rest(lines: queue.Queue) -> str:
    out = []
    while not lines.empty():
        out.append(lines.get())
    return "".join(out)


def drain(proc: subprocess.Popen, lines: queue.Queue, reader: threading.Thread, timeout: float) -> str:
    """Wait for the job to exit; everything it printed (the reader ends with the job's output)."""
    proc.wait(timeout=timeout)
    reader.join(timeout=60)
    return rest(lines)


def actors_by_class(cluster) -> list[dict]:
    """The cluster's live actors: class name, node id and pid."""
    import ray

    ray.init(address=cluster.address)
    try:
        return [{"class": a["ActorClassName"], "node": a["Address"]["NodeID"], "pid": a["Pid"]}
                for a in ray._private.state.actors().values() if a["State"] == "ALIVE"]
    finally:
        ray.shutdown()


def nodes_of(actors: list[dict], name: str) -> set[str]:
    return {a["node"] for a in actors if name in a["class"]}


def demo_shards(dest: Path, notes_bytes: int = 0) -> pa.Table:
    """8 input shards of 3 demo questions under ``dest``; ``notes_bytes``: each row also carries
    a text column of that size (carried through to the output)."""
    demo = pa.concat_tables([pq.read_table(p) for p in sorted(DEMO_QUERIES.glob("*.parquet"))]).slice(0, 24)
    if notes_bytes:
        demo = demo.append_column("notes", pa.array([f"{i:04d}" + "x" * (notes_bytes - 4) for i in range(24)]))
    dest.mkdir()
    for i in range(8):
        pq.write_table(demo.slice(3 * i, 3), dest / f"part-{i}.parquet")
    return demo


def check_output(out: Path, demo: pa.Table) -> None:
    """Every input row exactly once, no error row, every shard marked done, nothing left staged
    or half-written."""
    table = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))], promote_options="permissive")
    assert sorted(table.column("id").to_pylist()) == sorted(demo.column("id").to_pylist())
    assert table.column("error").null_count == table.num_rows
    assert len(list((out / "_done").glob("*.json"))) == 8
    assert not (out / "_staging").exists() or not any((out / "_staging").rglob("*.parquet"))
    assert not list(out.glob(".*.tmp"))


def test_a_lost_engine_node_is_replaced_and_the_run_completes(cluster, tmp_path, simulated_engine):
    engine_node = add_worker(cluster, ENGINE_CPUS)
    stage_node = add_worker(cluster, 1)
    demo = demo_shards(tmp_path / "in")
    out = tmp_path / "out"
    # one row at a time: the shards finish one after another, so the node goes mid-run
    proc, lines, reader = job(
        cluster.address, f"input.paths={tmp_path / 'in'}", f"output.path={out}", "selfrag.mode=never",
        f"retrieval.index_dir={tmp_path / 'index'}", f"engine.service.num_cpus={ENGINE_CPUS}",
        "engine.service.retry_backoff_s=2", "engine.service.request_retries=30", *simulated_engine,
        "stages.chain.batch_size=1", "stages.chain.max_concurrent_batches=1")
    before = wait_for_line(proc, lines, reader, "wrote ")
    actors = actors_by_class(cluster)
    assert nodes_of(actors, "SelfRagEngine") == {engine_node.node_id}, actors
    assert nodes_of(actors, "ShardWriter") == {stage_node.node_id}, actors
    cluster.remove_node(engine_node)
    add_worker(cluster, ENGINE_CPUS)  # a new node the replacement replica can start on
    output = "".join(before) + drain(proc, lines, reader, timeout=900)
    assert proc.returncode == 0, output[-4000:]
    assert "_run_module_as_main" not in output, output[-4000:]  # no traceback from the driver
    check_output(out, demo)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["this_run"]["rows"] == 24  # all in this one run
    assert manifest["stages"]["engine"]["startups"] == 2  # the replica, and its replacement on the new node


def test_a_lost_writer_node_fails_the_run_clearly_and_a_rerun_resumes(cluster, tmp_path, simulated_engine):
    paused = tmp_path / "paused"
    add_worker(cluster, ENGINE_CPUS)
    # the writer's node: the test hook holds the writer there at the commit of its first shard
    writer_node = add_worker(cluster, 1, env={PAUSE_AT: "commit", PAUSED_FILE: str(paused)})
    # rows twice the size of Ray Data's blocks here: a block holds one row, so a shard's rows
    # reach the writer in separate calls, and the writer holds the first ones between calls
    demo = demo_shards(tmp_path / "in", notes_bytes=2 * BLOCK_BYTES)
    out = tmp_path / "out"
    common = [f"input.paths={tmp_path / 'in'}", f"output.path={out}", "selfrag.mode=never",
              f"retrieval.index_dir={tmp_path / 'index'}", f"engine.service.num_cpus={ENGINE_CPUS}",
              "engine.service.retry_backoff_s=2", "engine.service.request_retries=30", *simulated_engine]
    # nothing is staged before a commit (no flush by time, a buffer larger than the input)
    proc, lines, reader = job(cluster.address, *common, "output.flush_s=3600", "stages.chain.batch_size=1",
                              "stages.chain.max_concurrent_batches=1")
    pid = wait_for_pause(proc, lines, paused, "commit")
    writer = [a for a in actors_by_class(cluster) if a["pid"] == pid]
    assert len(writer) == 1 and "ShardWriter" in writer[0]["class"] and writer[0]["node"] == writer_node.node_id, writer
    (hidden,) = out.glob(".part-*.parquet.*.tmp")  # the shard being committed: written, not moved into place
    shard = hidden.name[1:].split(".parquet.")[0] + ".parquet"
    assert not list(out.glob("*.parquet")) and not (out / "_staging").exists()
    cluster.remove_node(writer_node)
    add_worker(cluster, 1)  # a new node (without the hook) for the stages and the writer
    first = drain(proc, lines, reader, timeout=900)
    assert proc.returncode == 1, first[-4000:]
    assert "_run_module_as_main" not in first, first[-4000:]  # no traceback from the driver
    # one clear line, naming the shard whose first rows died with the writer
    failure = [ln for ln in first.splitlines() if ln.startswith("error: ")]
    assert len(failure) == 1 and "not completely annotated" in failure[0] and shard in failure[0], first[-4000:]
    assert "run the same command again" in failure[0]
    assert not (out / "_done" / f"{shard[:-len('.parquet')]}.json").exists()

    # the next run, rescaled (one actor pool per model stage, other batch sizes and replicas),
    # resumes to exactly once
    again, lines, reader = job(cluster.address, *common, "stages.chain=null", "stages.first_pass.batch_size=4",
                               "stages.first_pass.replicas=2")
    second = drain(again, lines, reader, timeout=900)
    assert again.returncode == 0, second[-4000:]
    check_output(out, demo)
    k = int(shard[len("part-"):-len(".parquet")])
    assert pq.read_table(out / shard).column("notes").to_pylist() == demo.slice(3 * k, 3).column("notes").to_pylist()
