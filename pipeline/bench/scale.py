"""The benchmark of scale-out (``make bench-scale``; what it measures: ``python -m jobs.bench_scale
--help``): the harness against K simulated GPU engine replicas on a local multi-node Ray."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

from ..infra.config import load_config, model_stages
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


def rows_window(stages: dict) -> tuple[float, float]:
    """(start, end) of a run's rows, in seconds on its timeline: from its first batch in a model
    stage to the last row written. (Not the engine's first request: the replicas' window
    starts with the warm-up's calls, which this driver made under the same Ray job.)"""
    return (min(stages[name]["first_start"] for name in model_stages("adaptive") if name in stages),
            stages["write"]["last_end"])


def model_seconds(engine: dict, model) -> float:
    """Seconds of work the latency model gave the engine replicas of a run, all together: its
    steps, and the prefill of the prompt tokens the prefix cache did not hold."""
    uncached = engine["prompt_tokens"] - engine["prefix_cache_hits"]
    return engine["steps"] * model.step_s + uncached * model.prefill_s_per_1k_tokens / 1000


@contextlib.contextmanager
def kept_services(overrides: list[str]):
    """The services of ``overrides`` deployed, warmed up and kept running (as ``jobs.serve``
    keeps them on a nightly cluster) while the block runs, then deleted; yields the overrides
    that make a job reuse them. The job's window then measures the harness against K running
    replicas, not their start-up: 8 simulated replicas, the retriever and the stage actors
    starting at once on 2 cores held the retrieval replica's start back 7 s into the window."""
    from ..infra.io import Storage
    from ..model.tokenizer import tokenizer_spec
    from ..run.preflight import ensure_index
    from ..runtime.ray_connect import init_ray, stop_ray
    from ..services.deploy import ENGINE_APP, RETRIEVER_APP, start_services, stop_services
    from ..services.warm_up import warm_up

    cfg = load_config([], list(overrides))
    storage = Storage(cfg.storage)
    ensure_index(cfg, storage)
    services = None
    init_ray(cfg.ray.address)
    try:
        tokenizer = tokenizer_spec(storage, cfg.engine.model)
        services = start_services(cfg, tokenizer, retrieval=True)
        warm_up(cfg, services, tokenizer)
        yield [f"engine.service.deployment={ENGINE_APP}", f"retrieval.service.deployment={RETRIEVER_APP}"]
    finally:
        if services is not None:
            init_ray(cfg.ray.address)  # the job disconnected this driver
            stop_services(services)
        stop_ray()


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

    simulated = load_config([], list(overrides)).engine.simulated
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    cluster = start_cluster(nodes)
    account = CpuAccount().start()
    per_k = []
    try:
        for k in ks:
            settings = [f"ray.address={cluster.address}", f"engine.simulated.recording={recording.absolute()}",
                        f"engine.service.replicas={k}", "engine.service.num_gpus=1", "engine.service.num_cpus=0.5",
                        *overrides]
            with kept_services(settings) as reuse:
                manifest, out = annotate(f"scale-{k}", rows, shards, [*settings, *reuse, "runner=ray"])
            stages, origin = manifest["stages"], manifest["this_run"]["timeline_origin"]
            engine = stages["engine"]
            start, end = rows_window(stages)
            window = end - start
            cores = account.cores(origin + start, origin + end)
            harness = harness_cores(cores)
            agree = sum(real.get(r["id"]) == (r["answer"], r["retrieved"]) for r in out)
            per_k.append({"k": k, "rows_per_s": manifest["this_run"]["rows"] / window, "harness_cores": harness,
                          "agree": agree, "errors": manifest["this_run"]["errors"],
                          "engine_requests_per_s": engine["requests"] / window,
                          "engine_busy": model_seconds(engine, simulated) / (k * window),
                          "engine_batch_fill": engine["mean_running_requests"] / simulated.max_num_seqs,
                          "cores": cores})
            print(f"K={k}: {per_k[-1]}", flush=True)
    finally:
        account.stop()
        cluster.shutdown()

    base = per_k[0]["rows_per_s"] / per_k[0]["k"]
    result = {
        "rows": len(rows),
        "simulated_engine": {key: getattr(simulated, key) for key in ("step_s", "max_num_seqs", "prefill_s_per_1k_tokens")},
        "latency_model_ratio": check["ratio"],
        "engine_requests_per_s_per_replica": [round(p["engine_requests_per_s"] / p["k"], 1) for p in per_k],
        "replicas": [p["k"] for p in per_k],
        "rows_per_s": [round(p["rows_per_s"], 2) for p in per_k],
        "efficiency": [round(p["rows_per_s"] / (p["k"] * base), 3) for p in per_k],
        "harness_cores": [round(p["harness_cores"], 2) for p in per_k],
        "engine_busy": [round(p["engine_busy"], 3) for p in per_k],
        "engine_batch_fill": [round(p["engine_batch_fill"], 3) for p in per_k],
        "error_rows": [p["errors"] for p in per_k],
        "answers_agree": f"{sum(p['agree'] for p in per_k)}/{len(rows) * len(per_k)}",
        "answers_agree_by_k": [p["agree"] for p in per_k],
    }
    print_figures("scale-out figures", result)
    return result
