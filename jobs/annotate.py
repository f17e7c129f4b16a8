"""Annotate Parquet shards of questions with Self-RAG.

    python -m jobs.annotate [--config FILE ...] [key=value ...]

Works locally (starts a local Ray) and as a ``ray job submit`` entrypoint (joins the cluster).
Writes one Parquet file per input shard, ``config.yaml`` and ``manifest.json`` to ``output.path``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from pipeline.config import Config, ConfigError, config_hash, load_config, to_yaml
from pipeline.io import InputError, join, write_text
from pipeline.preflight import PreflightError, preflight


def parse_args(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(config files, key=value overrides) from the command line."""
    parser = argparse.ArgumentParser(prog="python -m jobs.annotate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML preset (repeatable; later files win)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def run(cfg: Config) -> dict:
    """Run the pipeline (preflight first) and return the run summary."""
    import ray

    from pipeline.dataflow import build_dataset
    from pipeline.metrics import start_metrics

    shards, schema = preflight(cfg)
    run_id = cfg.run_id or config_hash(cfg)
    print(f"annotating {len(shards)} shard(s) -> {cfg.output.path} (run {run_id})", flush=True)

    ray.init(address=cfg.ray.address, ignore_reinit_error=True, logging_level=logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = cfg.ray.progress_bars
    context.shuffle_strategy = ray.data.context.ShuffleStrategy(cfg.ray.shuffle_strategy)
    metrics = start_metrics()
    start = time.time()
    written = build_dataset(cfg, shards, schema, run_id).take_all()
    elapsed = time.time() - start
    stages = ray.get(metrics.get.remote())
    ray.kill(metrics)
    for entry in stages.values():  # timeline relative to the start of the run
        for key in ("first_start", "last_end"):
            if key in entry:
                entry[key] = round(entry[key] - start, 2)

    rows = sum(w["rows"] for w in written)
    summary = {
        "run_id": run_id, "output": cfg.output.path, "shards": len(written), "rows": rows,
        "retrieved": sum(w["retrieved"] for w in written), "errors": sum(w["errors"] for w in written),
        "seconds": round(elapsed, 2), "rows_per_s": round(rows / elapsed, 3) if elapsed else None,
        "stages": stages,
        "per_shard": sorted(written, key=lambda w: w["shard"]),
    }
    write_text(join(cfg.output.path, "config.yaml"), to_yaml(cfg))
    write_text(join(cfg.output.path, "manifest.json"), json.dumps(summary, indent=2))
    return summary


def print_summary(summary: dict) -> None:
    """The short human summary printed at the end of a run."""
    rows = summary["rows"] or 1
    print(
        f"\ndone: {summary['rows']} rows in {summary['shards']} shard(s), "
        f"retrieval rate {summary['retrieved'] / rows:.1%}, {summary['errors']} error row(s), "
        f"{summary['rows_per_s']} rows/s\noutput: {summary['output']}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Entrypoint: returns the process exit code (2 for a refused config or input)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    files, overrides = parse_args(argv)
    try:
        cfg = load_config(files, overrides)
        summary = run(cfg)
    except (ConfigError, InputError, PreflightError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
