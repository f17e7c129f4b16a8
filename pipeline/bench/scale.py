"""The benchmark of scale-out (``make bench-scale``; what it measures: ``python -m jobs.bench_scale
--help``): the harness against K simulated GPU engine replicas on a local multi-node Ray."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from ..infra.config import load_config
from ..runtime import main_stop
from ..services.recording import read_records
from .common import BENCH_DIR, RECORDING, annotate, harness_cores, print_figures
from .cpu_account import CpuAccount
from .workload import workload

def real_outputs(rows: list[dict], shards: int, overrides: list[str]) -> tuple[Path, dict]:
    """(recording directory, answers by id) of a real-engine run on ``rows``: ``make bench``'s
    when its output has exactly these rows and its recording has outputs, else a new run."""
    out = BENCH_DIR / "main" / "out"
    try:
        answers = answers_of(out)
        recorded = read_records(RECORDING)
    except (FileNotFoundError, OSError, ValueError):
        answers, recorded = {}, []
    if set(answers) == {r["id"] for r in rows} and recorded and all("error" in r or "token_ids" in r for r in recorded):
        print(f"real-engine outputs: {RECORDING} ({len(recorded)} recorded prompts, from make bench)", flush=True)
        return RECORDING, answers
    print("real-engine outputs: recording a real-engine run of the workload ...", flush=True)
    import shutil

    shutil.rmtree(RECORDING, ignore_errors=True)
    annotate("main", rows, shards, [f"debug.record_engine_requests={RECORDING.absolute()}", *overrides])
    return RECORDING, answers_of(out)


def answers_of(out: Path) -> dict:
    """(answer, retrieved) by row id of an output directory."""
    import pyarrow.parquet as pq

    files = sorted(out.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(out)
    rows = [r for f in files for r in pq.read_table(f, columns=["id", "answer", "retrieved"]).to_pylist()]
    return {r["id"]: (r["answer"], r["retrieved"]) for r in rows}


def start_cluster(nodes: int):
    """A local Ray cluster: a head node without GPUs and ``nodes`` nodes of 2 logical GPUs."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 8, "num_gpus": 0})
    for _ in range(nodes):
        cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.wait_for_nodes()
    return cluster


def latency_check(recording: Path, overrides: list[str], prompts: int) -> dict:
    """One simulated replica in this process, given ``prompts`` recorded prompts at once:
    its measured seconds against the latency model's."""
    from ..services.simulated_engine import PrefixCache, SimulatedEngineReplica, predicted_seconds

    cfg = load_config([], [f"engine.simulated.recording={recording}", *overrides])
    records = [r for r in read_records(recording) if "token_ids" in r][:prompts]
    cache = PrefixCache()
    planned = [(len(r["token_ids"]), cache.uncached(r["prompt"])[0]) for r in records]

    async def measure() -> float:
        replica = object.__new__(SimulatedEngineReplica)  # as Serve builds it: the __init__ is asynchronous
        await replica.__init__(cfg.engine, cfg.storage, None)
        start = time.perf_counter()
        await asyncio.gather(*(replica.generate({"prompts": [r["prompt"]], "max_tokens": [r["max_tokens"]],
                                                 "stop_ids": r["stop_ids"]}) for r in records))
        return time.perf_counter() - start

    measured = asyncio.run(measure())
    predicted = predicted_seconds(cfg.engine.simulated, planned)
    return {"prompts": len(records), "measured_s": round(measured, 3), "predicted_s": round(predicted, 3),
            "ratio": round(measured / predicted, 4)}


def stop_on_sigterm(signum: int, _frame) -> None:
    """SIGTERM: stop the main thread, also inside a Ray call (where a ``SystemExit`` raised by a
    handler is printed and lost), so that the cluster is shut down on the way out; ``jobs.bench_scale``
    then exits with 128 + the signal's number."""
    main_stop.stop(SystemExit(128 + signum))


def benchmark(n_rows: int, shards: int, ks: list[int], nodes: int, check_prompts: int, overrides: list[str]) -> dict:
    """Run the benchmark on ``n_rows`` rows of the workload in ``shards`` shards, for each K of
    ``ks`` simulated replicas on ``nodes`` GPU nodes (2 GPUs each), the latency model checked on
    ``check_prompts`` recorded prompts, with the config ``overrides``; prints the figures and
    returns them."""
    rows = workload(n_rows)
    recording, real = real_outputs(rows, shards, list(overrides))
    check = latency_check(recording, list(overrides), check_prompts)
    print(f"latency model: {check}", flush=True)

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    cluster = start_cluster(nodes)
    account = CpuAccount().start()
    per_k = []
    try:
        for k in ks:
            manifest, out = annotate(f"scale-{k}", rows, shards, [
                f"ray.address={cluster.address}", f"engine.simulated.recording={recording.absolute()}",
                f"engine.service.replicas={k}", "engine.service.num_gpus=1", "engine.service.num_cpus=0.5",
                *overrides])
            engine, origin = manifest["stages"]["engine"], manifest["this_run"]["timeline_origin"]
            window = engine["last_end"] - engine["first_start"]
            cores = account.cores(origin + engine["first_start"], origin + engine["last_end"])
            harness = harness_cores(cores)
            agree = sum(real.get(r["id"]) == (r["answer"], r["retrieved"]) for r in out)
            per_k.append({"k": k, "rows_per_s": manifest["this_run"]["rows"] / window, "harness_cores": harness,
                          "agree": agree, "errors": manifest["this_run"]["errors"],
                          "engine_requests_per_s": engine["requests"] / window, "cores": cores})
            print(f"K={k}: {per_k[-1]}", flush=True)
    finally:
        account.stop()
        cluster.shutdown()

    base = per_k[0]["rows_per_s"] / per_k[0]["k"]
    result = {
        "rows": len(rows),
        "simulated_engine": {key: getattr(load_config([], list(overrides)).engine.simulated, key)
                             for key in ("step_s", "max_num_seqs", "prefill_s_per_1k_tokens")},
        "latency_model_ratio": check["ratio"],
        "engine_requests_per_s_per_replica": [round(p["engine_requests_per_s"] / p["k"], 1) for p in per_k],
        "replicas": [p["k"] for p in per_k],
        "rows_per_s": [round(p["rows_per_s"], 2) for p in per_k],
        "efficiency": [round(p["rows_per_s"] / (p["k"] * base), 3) for p in per_k],
        "harness_cores": [round(p["harness_cores"], 2) for p in per_k],
        "error_rows": [p["errors"] for p in per_k],
        "answers_agree": f"{sum(p['agree'] for p in per_k)}/{len(rows) * len(per_k)}",
        "answers_agree_by_k": [p["agree"] for p in per_k],
    }
    print_figures("scale-out figures", result)
    return result
