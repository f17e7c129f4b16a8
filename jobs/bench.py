"""Benchmark: the pipeline against the bare engine and against a per-query reference baseline.

    python -m jobs.bench [--rows 1600] [--shards 8] [--baseline-rows 48] [key=value ...]

1. Writes ``--rows`` questions of the synthetic world in ``--shards`` shards, mixed: free-form
   knowledge questions (55%), no-knowledge questions (10%), closed-set claims (``fever``, 10%)
   and four-choice questions (``arc_c``, 10%), and two-fact long-form questions (``asqa``, 15%);
   retrieval from the index.
2. Annotates them (local Ray, the defaults plus the overrides); the engine replicas record every
   request they serve.
3. Replays the recorded requests on one bare vLLM engine in this process (same engine config,
   all requests in one ``generate`` call, start-up not timed): the engine's best throughput
   on exactly the pipeline's work. ``engine_ratio`` = the pipeline's generated tokens/s over
   its generation window (first engine request to last) / the bare engine's tokens/s.
4. Runs the per-query baseline (``jobs.reference_baseline``: one question at a time,
   whole-vocabulary logprobs, the reference retrieval rule; long-form rows decoded over their
   passages as the authors' static long-form script does) on the first ``--baseline-rows``
   rows of the workload, which have its mix of kinds, with the passages the pipeline used.
   ``baseline_speedup`` = the pipeline's rows/s over its generation window / the baseline's
   rows/s (its engine start-up not timed; the pipeline also searches again per long-form
   segment, which the baseline does not, so the figure is conservative).
   ``baseline_speedup_short_form_only`` divides by the baseline's rows/s on the short-form rows
   alone (the figure reported before long-form rows were in the baseline). The pipeline
   annotates the same subset again with the reference rule, equal weights (1, 1, 1) and the
   same passages at every long-form depth, set on both sides; ``baseline_agree`` counts the
   short-form rows whose selected answers agree (two independent implementations), and
   ``baseline_agree_long_form`` the long-form rows (the same tree, run per query with
   whole-vocabulary logprobs).

5. Accounts for the machine's CPU (``jobs.cpu_account``): the mean cores each role used
   (engine worker, engine core, engine replica front end, retriever, stage actors, Ray, the
   driver) over the pipeline's generation window and over the bare engine's run.
   ``harness_cpu_ms_per_request``: the CPU of every role but the engine (its core and the
   replica in front of it) over the generation window, in ms per engine request.

6. A small job (the first ``--small-rows`` rows), each step a fresh process timed end to end:
   the pipeline (``small_job_seconds``); the plain script that imports vLLM, loads the model,
   generates the same engine requests batched and exits (``jobs.bare_engine``,
   ``bare_engine_process_seconds``; ``small_job_ratio`` = that / ``small_job_seconds``); and the
   pipeline as a new driver on a Ray cluster (``ray start --head``) whose services already run
   (``python -m jobs.serve``), reusing them (``small_job_seconds_warm``).

The figures are printed one per line; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.annotate import run
from jobs.cpu_account import CpuAccount
from jobs.reference_baseline import ReferenceSettings, annotate_long_form, annotate_one
from pipeline.config import Config, load_config
from pipeline.services.recording import read_records
from pipeline.stages.common import max_new_tokens
from pipeline.stages.long_form import is_long_form
from pipeline.synthetic.world import build_world, fact_sentence, lexicon, attribute_spec

BENCH_DIR = Path("outputs/bench")
#: Roles of the CPU account that are the engine (vLLM's processes and the replica in front of
#: them); everything else is the harness.
ENGINE_ROLES = ("engine_replica", "engine_core", "engine_worker")
RAY = str(Path(sys.executable).parent / "ray")  # the command line of this environment's Ray
MIX = {"knowledge": 0.55, "no_knowledge": 0.10, "fever": 0.10, "arc_c": 0.10, "long_form": 0.15}


def workload(rows: int, seed: int = 0) -> list[dict]:
    """``rows`` questions in the proportions of ``MIX``, interleaved, with unique ids."""
    world, rng = build_world(seed=0), random.Random(seed)
    entities = {e.id: e for e in world.entities}
    knowledge = world.questions(kind="knowledge")
    rng.shuffle(knowledge)
    picks: dict[str, list[dict]] = {}
    picks["knowledge"] = [{"instruction": q["instruction"], "task": None} for q in knowledge]
    nk = world.questions(kind="no_knowledge")
    picks["no_knowledge"] = [{"instruction": q["instruction"], "task": None} for q in nk]
    claims, choices = [], []
    for q in knowledge:
        entity = entities[q["id"].split("-")[0]]
        attr, value = q["attribute"], entity.attributes[q["attribute"]]
        pool = [v for v in lexicon().pools[attribute_spec(entity.type, attr).pool] if v != value]
        shown = value if rng.random() < 0.5 else rng.choice(pool)
        claims.append({"instruction": fact_sentence(entity, attr, shown), "task": "fever"})
        options = rng.sample(pool, 3) + [value]
        rng.shuffle(options)
        lines = "\n".join(f"{letter}: {option}" for letter, option in zip("ABCD", options))
        choices.append({"instruction": f"{q['instruction']}\n{lines}", "task": "arc_c"})
    picks["fever"], picks["arc_c"] = claims, choices
    picks["long_form"] = [{"instruction": q["instruction"], "task": "asqa"} for q in world.questions(kind="long_form")]
    counts = {kind: round(rows * share) for kind, share in MIX.items()}
    counts["knowledge"] += rows - sum(counts.values())
    chosen = []
    for kind, n in counts.items():
        pool = picks[kind]
        chosen += [{"kind": kind, **pool[i % len(pool)]} for i in range(n)]
    rng.shuffle(chosen)
    return [{"id": f"bench-{i:05d}", **row} for i, row in enumerate(chosen)]


def write_shards(dest: Path, rows: list[dict], shards: int) -> None:
    """The rows as ``shards`` Parquet shards under ``dest`` (replaced)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    schema = pa.schema([("id", pa.string()), ("instruction", pa.string()), ("task", pa.string()),
                        ("kind", pa.string())])
    for s in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[s::shards], schema=schema), dest / f"part-{s:05d}.parquet")


def annotate(name: str, rows: list[dict], shards: int, overrides: list[str]) -> tuple[dict, list[dict]]:
    """Run the annotation job on ``rows``; returns (manifest, output rows)."""
    write_shards(BENCH_DIR / name / "queries", rows, shards)
    out = BENCH_DIR / name / "out"
    cfg = load_config([], [f"input.paths=[{BENCH_DIR / name / 'queries'}]", f"output.path={out}",
                           "ray.progress_bars=false", "output.overwrite=true", *overrides])
    manifest = run(cfg)
    table = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))])
    import ray

    ray.shutdown()  # the next step gets the whole machine
    return manifest, table.to_pylist()


def timed(command: list[str], log: Path) -> float:
    """Seconds a fresh process takes to run ``command`` (its output to ``log``); it must succeed."""
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=fresh_env()).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {code}; see {log}")
    return time.perf_counter() - start


def fresh_env() -> dict:
    """This environment without a Ray address (each process starts or names its own)."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def small_jobs(rows: list[dict], overrides: list[str]) -> dict:
    """A small job end to end in fresh processes: the pipeline (``small_job_seconds``), the
    plain script that loads vLLM and generates the same engine requests
    (``bare_engine_process_seconds``), and the pipeline again with its services already
    running on a cluster (``small_job_seconds_warm``)."""
    name = BENCH_DIR / "small"
    write_shards(name / "queries", rows, 2)
    requests = (name / "engine-requests").absolute()
    shutil.rmtree(requests, ignore_errors=True)
    common = [f"input.paths=[{name / 'queries'}]", "output.overwrite=true", "ray.progress_bars=false", *overrides]
    job = [sys.executable, "-m", "jobs.annotate", *common]
    cold = timed([*job, f"output.path={name / 'out'}", f"debug.record_engine_requests={requests}"], name / "cold.log")
    bare = timed([sys.executable, "-m", "jobs.bare_engine", str(requests), *overrides], name / "bare.log")
    warm = warm_small_job(job, name, overrides)
    return {"small_job_rows": len(rows), "small_job_seconds": round(cold, 2), "bare_engine_process_seconds": round(bare, 2),
            "small_job_ratio": round(bare / cold, 3), "small_job_seconds_warm": round(warm, 2)}


def warm_small_job(job: list[str], name: Path, overrides: list[str]) -> float:
    """Seconds of ``job`` as a fresh driver on a Ray cluster whose services already run
    (started with ``python -m jobs.serve`` and stopped after)."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--disable-usage-stats"], check=True,
                   stdout=subprocess.DEVNULL, env=fresh_env())
    on_cluster = [f"ray.address={address}", *overrides]
    try:
        timed([sys.executable, "-m", "jobs.serve", *on_cluster], name / "serve.log")
        return timed([*job, f"output.path={name / 'out-warm'}", f"ray.address={address}",
                      "engine.service.deployment=selfrag-engine", "retrieval.service.deployment=selfrag-retriever"],
                     name / "warm.log")
    finally:
        subprocess.run([sys.executable, "-m", "jobs.serve", "--stop", *on_cluster], env=fresh_env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run([RAY, "stop", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def free_port() -> int:
    """A TCP port free on this machine now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bare_engine(cfg: Config, requests: list[dict]) -> dict:
    """One vLLM engine in this process generating every request at once (start-up not timed)."""
    from pipeline.engine import Engine

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
    from pipeline.engine import Engine
    from pipeline.tokenizer import model_prompt_tokens

    tokens = model_prompt_tokens(cfg.engine.model)
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1600)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--baseline-rows", type=int, default=64)
    parser.add_argument("--small-rows", type=int, default=120)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    rows = workload(args.rows)
    recorded = BENCH_DIR / "engine-requests"
    shutil.rmtree(recorded, ignore_errors=True)
    account = CpuAccount().start()
    manifest, out = annotate("main", rows, args.shards,
                             [f"debug.record_engine_requests={recorded.absolute()}", *args.overrides])
    summary, stages = manifest["this_run"], manifest["stages"]
    engine = stages["engine"]
    cfg = load_config([], list(args.overrides))
    bare = bare_engine(cfg, read_records(recorded))
    account.stop()
    origin = summary["timeline_origin"]

    small = small_jobs(rows[: args.small_rows], list(args.overrides))

    # the baseline's subset (the workload's mix), annotated again with the reference rule, equal
    # weights and the same passages at every long-form depth, as the baseline runs it
    settings = ReferenceSettings(threshold=cfg.selfrag.threshold)
    subset = rows[: args.baseline_rows]
    ref_overrides = ["selfrag.retrieval_rule=reference_logprob_ratio", "selfrag.w_rel=1.0", "selfrag.w_sup=1.0",
                     "selfrag.w_use=1.0", "selfrag.long_form.retrieve_per_segment=false", *args.overrides]
    _, ref_out = annotate("reference", subset, 2, ref_overrides)
    base = baseline(cfg, ref_out, settings)
    agrees = {r["id"]: r["answer"] == base["answers"][r["id"]]["answer"] and
              r["retrieved"] == base["answers"][r["id"]]["retrieved"] for r in ref_out}
    long_ids = {r["id"] for r in subset if is_long_form(r["task"], cfg)}

    window = engine["last_end"] - engine["first_start"]
    tokens = engine["generated_tokens"]
    pipeline_cores = account.cores(origin + engine["first_start"], origin + engine["last_end"])
    harness_cores = sum(v for role, v in pipeline_cores.items() if role not in ENGINE_ROLES)
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
        "harness_cpu_ms_per_request": round(harness_cores * window * 1000 / engine["requests"], 2),
        **small,
    }
    print_figures("benchmark figures", result)
    return result


def print_figures(title: str, result: dict) -> None:
    """A benchmark's figures, one per line, then the same as one JSON object on the last line."""
    print(f"\n{title}:")
    for key, value in result.items():
        print(f"  {key:32s} {value}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
