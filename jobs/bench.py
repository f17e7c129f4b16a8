"""Benchmark: the annotation pipeline against the bare vLLM engine on the same prompts.

    python -m jobs.bench [--rows N] [--shards S] [key=value ...]

1. Writes N held-out questions of the synthetic world (knowledge and no-knowledge) as S shards.
2. Runs the annotation job on them (local Ray, config defaults plus the overrides).
3. Rebuilds from the output every prompt the pipeline sent to its engines (decision prompts
   with 1 new token; the no-evidence and evidence prompts with their budgets) and generates
   them with one bare ``Engine`` in this process, with the same sampling parameters.

``engine_ratio`` = pipeline tokens/s / bare engine tokens/s, both without engine start-up
(the pipeline's wall time minus its slowest engine replica's start-up; the bare engine's
generate calls only). ``engine_ratio_end_to_end`` includes start-up on both sides. The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.annotate import run
from pipeline.config import Config, load_config
from pipeline.stages.common import max_new_tokens
from pipeline.synthetic.world import build_world

BENCH_DIR = Path("outputs/bench")


def write_queries(dest: Path, rows: int, shards: int) -> None:
    """``rows`` held-out questions of the default world, knowledge and no-knowledge interleaved."""
    world = build_world()
    knowledge = world.questions(split="heldout", kind="knowledge")
    other = world.questions(split="heldout", kind="no_knowledge")
    mixed = [q for pair in zip(knowledge, other * (len(knowledge) // max(len(other), 1) + 1)) for q in pair]
    picked = mixed[:rows]
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for s in range(shards):
        part = picked[s::shards]
        pq.write_table(pa.table({
            "id": [f"{q['id']}-{s}-{i}" for i, q in enumerate(part)],
            "instruction": [q["instruction"] for q in part],
            "answers": [q["answers"] for q in part],
        }), dest / f"part-{s:05d}.parquet")


def engine_workload(rows: list[dict], cfg: Config) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """(decision prompts, generation prompts, their budgets) as token ids: what the pipeline's
    engines generated."""
    from pipeline.tokenizer import model_prompt_tokens

    tokens, _ = model_prompt_tokens(cfg.engine.model)
    decisions = [tokens.prompt(r["prompt"]) for r in rows if r["error"] is None and cfg.selfrag.mode == "adaptive"]
    prompts, budgets = [], []
    for r in rows:
        if r["error"] is not None:
            continue
        budget = max_new_tokens(r.get(cfg.input.task_column), cfg)
        if r["retrieved"]:
            generated = [p for p, c in zip(r["passages"], r["candidates"]) if c["error"] is None]
            prompts += [tokens.evidence(tokens.prompt(r["prompt"]), p["title"], p["text"]) for p in generated]
            budgets += [budget] * len(generated)
        else:
            prompts.append(tokens.no_evidence(tokens.prompt(r["prompt"])))
            budgets.append(budget)
    return decisions, prompts, budgets


def bare_engine(cfg: Config, decisions: list[str], prompts: list[str], budgets: list[int]) -> dict:
    """Start one engine in this process and time it generating the workload in two batched calls."""
    from pipeline.engine import Engine

    start = time.perf_counter()
    engine = Engine(cfg.engine)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    outs = engine.generate(decisions, 1) + engine.generate(prompts, budgets)
    seconds = time.perf_counter() - start
    engine.shutdown()
    return {"startup_seconds": startup, "seconds": seconds, "tokens": sum(len(o.token_ids) for o in outs)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    write_queries(BENCH_DIR / "queries", args.rows, args.shards)
    cfg = load_config([], [f"input.paths=[{BENCH_DIR / 'queries'}]", f"output.path={BENCH_DIR / 'out'}",
                           "ray.progress_bars=false", "output.overwrite=true", *args.overrides])
    manifest = run(cfg)
    summary, stages = manifest["this_run"], manifest["stages"]
    rows = pa.concat_tables([pq.read_table(p) for p in sorted((BENCH_DIR / "out").glob("*.parquet"))]).to_pylist()

    import ray

    ray.shutdown()  # give the bare engine the whole machine
    bare = bare_engine(cfg, *engine_workload(rows, cfg))

    tokens = sum(s.get("generated_tokens", 0) for s in stages.values())
    startup = max(stages.get(s, {}).get("init_seconds", 0.0) for s in ("first_pass", "critique"))
    warm = max(summary["seconds"] - startup, 1e-9)
    result = {
        "rows": summary["rows"],
        "rows_per_s": round(summary["rows"] / summary["seconds"], 3),
        "rows_per_s_warm": round(summary["rows"] / warm, 3),
        "generated_tokens": tokens,
        "generated_tokens_per_s": round(tokens / warm, 1),
        "retrieval_rate": round(summary["retrieved"] / max(summary["rows"], 1), 3),
        "errors": summary["errors"],
        "pipeline_seconds": summary["seconds"],
        "engine_startup_seconds": round(startup, 2),
        "stage_seconds": {name: round(s.get("seconds", 0.0), 2) for name, s in stages.items()},
        "stage_timeline": {name: [s.get("first_start"), s.get("last_end")] for name, s in stages.items()},
        "stage_init_seconds": {name: round(s["init_seconds"], 2) for name, s in stages.items() if "init_seconds" in s},
        "bare_engine_tokens": bare["tokens"],
        "bare_engine_seconds": round(bare["seconds"], 2),
        "bare_engine_tokens_per_s": round(bare["tokens"] / bare["seconds"], 1),
        "engine_ratio": round((tokens / warm) / (bare["tokens"] / bare["seconds"]), 3),
        "engine_ratio_end_to_end": round((bare["seconds"] + bare["startup_seconds"]) / summary["seconds"], 3),
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
