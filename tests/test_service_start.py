"""Services that cannot run end the job with one line instead of a silent wait: a request the
local Ray cannot hold is refused before anything is deployed, and a service that does not start
within ``start_timeout_s`` stops the job (real Ray and Serve, in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from pipeline.infra.config import load_config
from pipeline.runtime import phases
from pipeline.services.deploy import check_resources, replica_demands


def test_a_request_beyond_the_cluster_names_what_was_asked_and_what_there_is():
    cfg = load_config([], ["engine.service.replicas=2"])
    why = check_resources(replica_demands(cfg, retrieval=True), [{"CPU": 2.0, "memory": 1e9}])
    # 2 engine replicas x 1 + retriever 0.25 + 2 stage actors (the chain, the writer) x 0.1
    assert why.startswith("the job asks for CPU 2.45 (services and stage actors) but the cluster has CPU 2:")


def test_a_replica_larger_than_every_node_is_named_even_when_the_sum_fits():
    cfg = load_config([], ["engine.service.num_cpus=3"])
    why = check_resources(replica_demands(cfg, retrieval=True), [{"CPU": 2.0}, {"CPU": 2.0}])
    assert why == "one engine.service replica asks for CPU 3, more than any node of the cluster has (the largest: CPU 2)"


def test_what_fits_passes_and_reused_services_ask_for_nothing():
    assert check_resources(replica_demands(load_config(), retrieval=True), [{"CPU": 2.0}]) is None
    cfg = load_config([], ["engine.service.deployment=running-engine", "engine.service.num_gpus=8"])
    assert all(what != "engine.service" for what, _ in replica_demands(cfg, retrieval=False))


def test_the_one_writer_is_counted_once_whatever_its_replicas_say():
    cfg = load_config([], ["stages.write.replicas=30"])  # the dataflow builds one writer, always
    assert check_resources(replica_demands(cfg, retrieval=True), [{"CPU": 2.0}]) is None


def test_stage_actors_follow_the_mode_and_the_chain():
    def whats(mode, *overrides):
        cfg = load_config([], [f"selfrag.mode={mode}", *overrides])
        return sorted({w for w, _ in replica_demands(cfg, mode != "never")})

    assert whats("never") == whats("always")[:1] + ["stages.chain", "stages.write"]  # chained: one pool
    assert whats("always") == ["engine.service", "retrieval.service", "stages.chain", "stages.write"]
    assert whats("never", "stages.chain=null") == ["engine.service", "stages.first_pass", "stages.write"]
    assert whats("always", "stages.chain=null") == ["engine.service", "retrieval.service", "stages.critique",
                                                     "stages.retrieve", "stages.write"]


def test_the_chain_asks_for_its_replicas():
    cfg = load_config([], ["stages.chain.replicas=3", "stages.chain.num_cpus=0.5"])
    assert [bundles for what, bundles in replica_demands(cfg, True) if what == "stages.chain"] == [[{"CPU": 0.5}]] * 3


def test_the_start_watcher_ends_with_the_job_and_calls_serve_no_more(monkeypatch):
    """A job that ends before its services run (nothing to do, or a failed stage) stops watching
    them: the watcher, left polling, would call Serve after the job's Ray was shut down, and Serve
    would start a new local Ray in the driver (CI failed so: a Ray left by an earlier module)."""
    import threading

    from ray import serve

    from pipeline.services import deploy

    polled = threading.Event()

    def status():
        polled.set()
        return SimpleNamespace(applications={})  # never running

    monkeypatch.setattr(serve, "status", status)
    with deploy.services_awaited_beside(deploy.Services(owned=[deploy.ENGINE_APP], start_timeout_s=600)):
        assert polled.wait(60)  # the watcher polls while the body runs
    assert not [t for t in threading.enumerate() if t.name == deploy.WATCH_THREAD]  # it polled its last


def run_job(tmp_path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"instruction": ["Say hello."]}), tmp_path / "in" / "q.parquet")
    env = dict(os.environ, **(env or {}))
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "jobs.annotate", f"input.paths={tmp_path / 'in'}",
                           f"output.path={tmp_path / 'out'}", "selfrag.mode=never", "runner=ray", *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_services_the_local_ray_cannot_hold_are_refused_before_deploying(tmp_path):
    proc = run_job(tmp_path, "engine.service.replicas=2", "engine.service.num_cpus=512")
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: refused before deploying: the job asks for CPU 1024.2 (services and stage actors) but the cluster "
        "has CPU "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "services ready" not in proc.stdout
    assert not list((tmp_path / "out").glob("*.parquet"))


@pytest.mark.integration
@pytest.mark.parametrize("overlap", ["false", "true"])  # true: the stages already run when the wait fails
def test_a_service_not_running_within_its_start_timeout_stops_the_job(tmp_path, overlap, simulated_engine):
    """The engine replica is held at its start by the test hook, so it can never be running
    when the job looks (however slow the machine)."""
    proc = run_job(tmp_path, "engine.service.start_timeout_s=0.001", f"stages.start_with_services={overlap}",
                   *simulated_engine, env={phases.PAUSE_AT: "engine_start"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: selfrag-engine not running 0.001 s after deployment (start_timeout_s): the cluster has CPU "), \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "(raylet)" not in proc.stdout + proc.stderr
    assert not list((tmp_path / "out").glob("*.parquet"))
