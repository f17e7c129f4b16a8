"""The throughput benchmark (``make bench``; what it measures: ``python -m jobs.bench --help``):
the pipeline against the bare engine replaying its requests and against the per-query
reference baseline, the CPU by role, and a small job in fresh processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..infra.config import Config, load_config
from ..services.recording import read_records
from ..stages.common import max_new_tokens
from ..stages.tree_decoding import is_long_form
from .common import BENCH_DIR, RAY, RECORDING, annotate, free_port, fresh_env, harness_cores, print_figures, timed
from .cpu_account import CpuAccount
from .reference_baseline import ReferenceSettings, annotate_long_form, annotate_one
from .workload import MIX, workload, write_shards


def benchmark(n_rows: int, shards: int, baseline_rows: int, small_rows: int, overrides: list[str]) -> dict:
    """Run the whole benchmark on ``n_rows`` rows of the workload in ``shards`` shards (the
    baseline on the first ``baseline_rows``, the small job on the first ``small_rows``), with
    the config ``overrides``; prints the figures and returns them."""
    rows = workload(n_rows)
    recorded = RECORDING
    shutil.rmtree(recorded, ignore_errors=True)
    account = CpuAccount().start()
    manifest, out = annotate("main", rows, shards,  # the distributed harness: Ray Data stages, Serve services
                             [f"debug.record_engine_requests={recorded.absolute()}", "runner=ray", *overrides])
    summary, stages = manifest["this_run"], manifest["stages"]
    engine = stages["engine"]
    cfg = load_config([], list(overrides))
    bare = bare_engine(cfg, read_records(recorded))
    account.stop()
    origin = summary["timeline_origin"]
    bare["cpu_seconds"] = sum(v for role, v in account.cores(*bare["window"]).items() if role != "other") * bare["seconds"]
    here = in_process_run(rows, shards, overrides, out, bare)

    small = small_jobs(rows[:small_rows], list(overrides))

    # the baseline's subset (the workload's mix), annotated again with the reference rule, equal
    # weights and the same passages at every long-form depth, as the baseline runs it
    settings = ReferenceSettings(threshold=cfg.selfrag.threshold)
    subset = rows[:baseline_rows]
    ref_overrides = ["selfrag.retrieval_rule=reference_logprob_ratio", "selfrag.w_rel=1.0", "selfrag.w_sup=1.0",
                     "selfrag.w_use=1.0", "selfrag.long_form.retrieve_per_segment=false", *overrides]
    _, ref_out = annotate("reference", subset, 2, ref_overrides)
    base = baseline(cfg, ref_out, settings)
    agrees = {r["id"]: r["answer"] == base["answers"][r["id"]]["answer"] and
              r["retrieved"] == base["answers"][r["id"]]["retrieved"] for r in ref_out}
    long_ids = {r["id"] for r in subset if is_long_form(r["task"], cfg)}

    window = engine["last_end"] - engine["first_start"]
    tokens = engine["generated_tokens"]
    pipeline_cores = account.cores(origin + engine["first_start"], origin + engine["last_end"])
    harness = harness_cores(pipeline_cores)
    encoding = stages.get("retriever", {}).get("encode_cpu_seconds", 0.0)  # the query encoder's model
    result = {
        "rows": summary["rows"],
        "rows_by_kind": {k: sum(r["kind"] == k for r in rows) for k in MIX},
        "errors": summary["errors"],
        "retrieval_rate": round(summary["retrieved"] / max(summary["rows"], 1), 3),
        "pipeline_seconds": summary["seconds"],
        "generation_window_seconds": round(window, 2),
        "rows_per_s": round(summary["rows"] / summary["seconds"], 3),
        "rows_per_s_warm": round(summary["rows"] / window, 3),
        "generated_tokens": tokens,
        "generated_tokens_per_s": round(tokens / window, 1),
        "engine_requests": engine["requests"],
        "engine_startups": engine["startups"],
        "engine_startup_seconds": round(engine["init_seconds"], 2),
        "prefix_cache_hit_rate": engine.get("prefix_cache_hit_rate"),
        "stage_seconds": {name: round(s.get("seconds", 0.0), 2) for name, s in stages.items()},
        "stage_timeline": {name: [s.get("first_start"), s.get("last_end")] for name, s in stages.items()},
        "bare_engine_tokens": bare["tokens"],
        "bare_engine_seconds": round(bare["seconds"], 2),
        "bare_engine_tokens_per_s": round(bare["tokens"] / bare["seconds"], 1),
        "engine_ratio": round((tokens / window) / (bare["tokens"] / bare["seconds"]), 3),
        "baseline_rows": len(subset),
        "baseline_rows_by_kind": {k: sum(r["kind"] == k for r in subset) for k in MIX},
        "baseline_seconds_per_row_by_kind": base["seconds_per_row_by_kind"],
        "baseline_rows_per_s": round(base["rows_per_s"], 3),
        "baseline_speedup": round((summary["rows"] / window) / base["rows_per_s"], 1),
        "baseline_speedup_end_to_end": round((summary["rows"] / summary["seconds"]) / base["rows_per_s"], 1),
        "baseline_speedup_short_form_only": round((summary["rows"] / window) / base["short_form_rows_per_s"], 1),
        "baseline_agree": f"{sum(v for i, v in agrees.items() if i not in long_ids)}/{len(agrees) - len(long_ids)}",
        "baseline_agree_long_form": f"{sum(v for i, v in agrees.items() if i in long_ids)}/{len(long_ids)}",
        "baseline_vocabulary_logprobs": base["vocabulary"],
        "cpu_cores": {"machine": os.cpu_count(), "pipeline_window": pipeline_cores,
                      "bare_engine": account.cores(*bare["window"])},
        "harness_cpu_ms_per_request": round(harness * window * 1000 / engine["requests"], 2),
        "query_encoder_cpu_ms_per_request": round(encoding * 1000 / engine["requests"], 2),
        "harness_cpu_ms_per_request_with_gpu_encoder": round((harness * window - encoding) * 1000 / engine["requests"], 2),
        "cpu_ms_per_request_beyond_bare": beyond_bare(pipeline_cores, window, bare, engine["requests"]),
        **here,
        **small,
    }
    print_figures("benchmark figures", result)
    return result


def in_process_run(rows: list[dict], shards: int, overrides: list[str], ray_rows: list[dict], bare: dict) -> dict:
    """The same workload with ``runner=in_process`` (one process, no Ray): its rows/s end to
    end and over its generation window, its engine ratio, and how many answers equal the Ray
    run's (``ray_rows``)."""
    account = CpuAccount().start()
    manifest, rows_here = annotate("in_process", rows, shards, ["runner=in_process", *overrides])
    account.stop()
    summary, engine = manifest["this_run"], manifest["stages"]["engine"]
    window = engine["last_end"] - engine["first_start"]
    origin = summary["timeline_origin"]
    cores = account.cores(origin + engine["first_start"], origin + engine["last_end"])
    theirs = {r["id"]: r["answer"] for r in ray_rows}
    return {"in_process_rows_per_s": round(summary["rows"] / summary["seconds"], 3),
            "in_process_rows_per_s_warm": round(summary["rows"] / window, 3),
            "in_process_engine_ratio": round((engine["generated_tokens"] / window) / (bare["tokens"] / bare["seconds"]), 3),
            "in_process_cpu_cores": cores,
            "in_process_cpu_ms_per_request_beyond_bare": beyond_bare(cores, window, bare, engine["requests"]),
            "in_process_answers_agree": f"{sum(r['answer'] == theirs.get(r['id']) for r in rows_here)}/{len(rows_here)}"}


def beyond_bare(cores: dict[str, float], window: float, bare: dict, requests: int) -> float:
    """The CPU a run spent over its generation window (every role of the job: ``cores``) beyond
    what the bare engine spent on the same requests, in ms per engine request: the harness's
    cost measured without telling its processes or threads apart (in one process they are one)."""
    used = sum(v for role, v in cores.items() if role != "other") * window
    return round((used - bare["cpu_seconds"]) * 1000 / requests, 2)


def small_jobs(rows: list[dict], overrides: list[str]) -> dict:
    """A small job end to end in fresh processes: the pipeline as a user starts it on one
    machine (``runner`` auto: in this process, ``small_job_seconds``) and on a local Ray of its
    own (``small_job_seconds_ray``), the plain script that loads vLLM and generates the same
    engine requests (``bare_engine_process_seconds``), and the pipeline again with its services
    already running on a cluster (``small_job_seconds_warm``: ``runner`` auto, its stages in the
    driver; on Ray Data: ``small_job_seconds_warm_ray``)."""
    name = BENCH_DIR / "small"
    write_shards(name / "queries", rows, 2)
    requests = (name / "engine-requests").absolute()
    shutil.rmtree(requests, ignore_errors=True)
    common = [f"input.paths=[{name / 'queries'}]", "output.overwrite=true", "ray.progress_bars=false", *overrides]
    job = [sys.executable, "-m", "jobs.annotate", *common]
    cold = timed([*job, f"output.path={name / 'out'}", f"debug.record_engine_requests={requests}"], name / "cold.log")
    bare = timed([sys.executable, "-m", "jobs.bare_engine", str(requests), *overrides], name / "bare.log")
    on_ray = timed([*job, f"output.path={name / 'out-ray'}", "runner=ray"], name / "cold-ray.log")
    warm, warm_ray = warm_small_job(job, name, overrides)
    return {"small_job_rows": len(rows), "small_job_runner": runner_of(name / "out"),
            "small_job_seconds": round(cold, 2), "bare_engine_process_seconds": round(bare, 2),
            "small_job_ratio": round(bare / cold, 3), "small_job_seconds_ray": round(on_ray, 2),
            "small_job_ratio_ray": round(bare / on_ray, 3), "small_job_seconds_warm": round(warm, 2),
            "small_job_warm_runner": runner_of(name / "out-warm"), "small_job_seconds_warm_ray": round(warm_ray, 2)}


def runner_of(out: Path) -> str:
    """Where a job's run went (its manifest's ``runner``)."""
    import json

    return json.loads((out / "_manifest.json").read_text())["this_run"]["runner"]


def warm_small_job(job: list[str], name: Path, overrides: list[str]) -> tuple[float, float]:
    """Seconds of ``job`` as a fresh driver on a Ray cluster whose services already run
    (started with ``python -m jobs.serve`` and stopped after): as a user starts it (``runner``
    auto: a small job's stages in the driver), then with its stages on Ray Data (``runner=ray``)."""
    subprocess.run([RAY, "start", "--head", f"--port={free_port()}", "--disable-usage-stats"], check=True,
                   stdout=subprocess.DEVNULL, env=fresh_env())
    on_cluster = ["ray.address=auto", *overrides]  # the cluster just started (its address is on the node's IP)
    try:
        timed([sys.executable, "-m", "jobs.serve", *on_cluster], name / "serve.log")
        reuse = [*job, "ray.address=auto", "engine.service.deployment=selfrag-engine",
                 "retrieval.service.deployment=selfrag-retriever"]
        return (timed([*reuse, f"output.path={name / 'out-warm'}"], name / "warm.log"),
                timed([*reuse, f"output.path={name / 'out-warm-ray'}", "runner=ray"], name / "warm-ray.log"))
    finally:
        subprocess.run([sys.executable, "-m", "jobs.serve", "--stop", *on_cluster], env=fresh_env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run([RAY, "stop", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def bare_engine(cfg: Config, requests: list[dict]) -> dict:
    """One vLLM engine in this process generating every request at once (start-up not timed)."""
    from ..model.vllm_engine import Engine

    start = time.perf_counter()
    engine = Engine(cfg.engine)
    startup = time.perf_counter() - start
    start, began = time.perf_counter(), time.time()
    outputs = engine.replay(requests)
    seconds = time.perf_counter() - start
    engine.shutdown()
    return {"startup_seconds": startup, "seconds": seconds, "window": (began, began + seconds),
            "tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}


def baseline(cfg: Config, rows: list[dict], settings: ReferenceSettings) -> dict:
    """The per-query reference baseline on ``rows`` (pipeline output rows: their prompts and
    passages); returns its answers by id, its rows/s, and its seconds by kind of row (engine
    start-up not timed)."""
    from ..infra.io import Storage
    from ..model.vllm_engine import Engine
    from ..model.tokenizer import model_prompt_tokens

    tokens = model_prompt_tokens(Storage(cfg.storage), cfg.engine.model)
    engine = Engine(cfg.engine, max_logprobs=-1)  # -1: whole-vocabulary logprobs allowed
    vocabulary = engine.llm.llm_engine.model_config.get_vocab_size()
    answers, by_kind = {}, {}
    for r in rows:
        start = time.perf_counter()
        prompt_ids, budget = tokens.prompt(r["prompt"]), max_new_tokens(r["task"], cfg)
        if is_long_form(r["task"], cfg):
            answers[r["id"]] = annotate_long_form(cfg, engine, tokens, r, prompt_ids, budget, vocabulary, settings)
        else:
            answers[r["id"]] = annotate_one(engine, tokens, prompt_ids, r["passages"] or [], r["task"], budget,
                                            vocabulary, settings)
        by_kind.setdefault(r["kind"], []).append(time.perf_counter() - start)
    engine.shutdown()
    seconds = sum(sum(v) for v in by_kind.values())
    short = [t for kind, v in by_kind.items() if kind != "long_form" for t in v]
    return {"answers": answers, "seconds": seconds, "rows_per_s": len(rows) / seconds, "vocabulary": vocabulary,
            "short_form_rows_per_s": len(short) / sum(short) if short else None,
            "seconds_per_row_by_kind": {kind: round(sum(v) / len(v), 3) for kind, v in sorted(by_kind.items())}}
