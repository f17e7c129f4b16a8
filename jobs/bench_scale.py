"""Benchmark of scale-out: the harness against K = 1, 2, 4, 8 simulated GPU engine replicas.

    python -m jobs.bench_scale [--rows 1600] [--replicas 1,2,4,8] [--nodes 4] [key=value ...]

1. The real engine's outputs for the benchmark workload (``jobs.bench.workload``): the
   recording ``make bench`` leaves in ``outputs/bench/engine-requests`` when it covers these
   rows, else one real-engine run here that records them.
2. A local multi-node Ray cluster (``ray.cluster_utils.Cluster``): a head node for the driver,
   the stage actors and the retriever, and ``--nodes`` nodes of 2 (logical) GPUs each, so
   engine replicas (one GPU each) spread over the nodes.
3. For each K, the annotation job on the same rows with K simulated engine replicas
   (``engine.simulated``: the recorded outputs, after the latency model's time; see
   ``pipeline.services.simulated_engine``). Per K: rows/s over the generation window (first
   engine request to last), the efficiency rows/s(K) / (K x rows/s(1)), the harness's mean
   cores over the window (every process except the engine replicas: stage actors, retriever,
   Ray, Serve, the driver), and how many selected answers equal the real-engine run's.
4. The latency model honoured: one simulated replica in this process gets the first
   ``--check-prompts`` recorded prompts at once; ``latency_model_ratio`` = its measured seconds
   over the model's arithmetic (``predicted_seconds``).

The figures are printed one per line; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path

from jobs.bench import BENCH_DIR, ENGINE_ROLES, annotate, print_figures, workload
from jobs.cpu_account import CpuAccount
from pipeline.config import load_config
from pipeline.services.recording import read_records

RECORDING = BENCH_DIR / "engine-requests"


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
    from pipeline.services.simulated_engine import PrefixCache, SimulatedEngineReplica, predicted_seconds

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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1600)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--replicas", default="1,2,4,8", help="comma-separated K values")
    parser.add_argument("--nodes", type=int, default=4, help="GPU nodes of the local cluster (2 GPUs each)")
    parser.add_argument("--check-prompts", type=int, default=2000)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.replicas.split(",")]
    if max(ks) > 2 * args.nodes:
        parser.error(f"--replicas up to {max(ks)} needs --nodes of at least {(max(ks) + 1) // 2}")

    rows = workload(args.rows)
    recording, real = real_outputs(rows, args.shards, list(args.overrides))
    check = latency_check(recording, list(args.overrides), args.check_prompts)
    print(f"latency model: {check}", flush=True)

    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))  # the cluster is shut down on the way out
    cluster = start_cluster(args.nodes)
    account = CpuAccount().start()
    per_k = []
    try:
        for k in ks:
            manifest, out = annotate(f"scale-{k}", rows, args.shards, [
                f"ray.address={cluster.address}", f"engine.simulated.recording={recording.absolute()}",
                f"engine.service.replicas={k}", "engine.service.num_gpus=1", "engine.service.num_cpus=0.5",
                *args.overrides])
            engine, origin = manifest["stages"]["engine"], manifest["this_run"]["timeline_origin"]
            window = engine["last_end"] - engine["first_start"]
            cores = account.cores(origin + engine["first_start"], origin + engine["last_end"])
            harness = sum(v for role, v in cores.items() if role not in ENGINE_ROLES)
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
        "simulated_engine": {key: getattr(load_config([], list(args.overrides)).engine.simulated, key)
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


if __name__ == "__main__":
    main()
