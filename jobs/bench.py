"""Benchmark: the pipeline against the bare engine and against a per-query reference baseline.

    python -m jobs.bench [--rows 1600] [--shards 8] [--baseline-rows 48] [key=value ...]

1. Writes ``--rows`` questions of the synthetic world in ``--shards`` shards, mixed: free-form
   knowledge questions (55%), no-knowledge questions (10%), closed-set claims (``fever``, 10%)
   and four-choice questions (``arc_c``, 10%), and two-fact long-form questions (``asqa``, 15%);
   retrieval from the index.
2. Annotates them on a local Ray (``runner=ray``: Ray Data stages, Serve services; the defaults
   plus the overrides); the engine replicas record every request they serve. Then annotates
   them again in one process (``runner=in_process``): ``in_process_rows_per_s`` (end to end),
   ``in_process_rows_per_s_warm`` (over its generation window), ``in_process_engine_ratio``
   (as ``engine_ratio`` below) and ``in_process_answers_agree`` (answers equal to the Ray run's).
3. Replays the recorded requests on one bare vLLM engine in this process (same engine config,
   all requests in one ``generate`` call, start-up not timed): the engine's best throughput
   on exactly the pipeline's work. ``engine_ratio`` = the pipeline's generated tokens/s over
   its generation window (first engine request to last) / the bare engine's tokens/s.
4. Runs the per-query baseline (``pipeline.bench.reference_baseline``: one question at a time,
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

5. Accounts for the machine's CPU (``pipeline.bench.cpu_account``): the mean cores each role used
   (engine worker, engine core, engine replica front end, retriever, stage actors, Ray, the
   driver) over the pipeline's generation window and over the bare engine's run.
   ``harness_cpu_ms_per_request``: the CPU of every role but the engine (its core and the
   replica in front of it) over the generation window, in ms per engine request;
   ``query_encoder_cpu_ms_per_request``: the part of it that is the retrieval replica's query
   encoder computing (its model on this CPU), and ``harness_cpu_ms_per_request_with_gpu_encoder``
   the rest: what stays on the CPU when the encoder has a GPU (``retrieval.device: cuda``).

6. A small job (the first ``--small-rows`` rows), each step a fresh process timed end to end:
   the pipeline as a user starts it on one machine (``small_job_seconds``; ``runner`` auto,
   which there means in one process: ``small_job_runner``); the plain script that imports
   vLLM, loads the model, generates the same engine requests batched and exits
   (``jobs.bare_engine``, ``bare_engine_process_seconds``; ``small_job_ratio`` = that /
   ``small_job_seconds``); the pipeline on a local Ray of its own (``runner=ray``,
   ``small_job_seconds_ray``, ``small_job_ratio_ray``); and the pipeline as a new driver on a
   Ray cluster (``ray start --head``) whose services already run (``python -m jobs.serve``),
   reusing them: as a user starts it (``small_job_seconds_warm``; ``runner`` auto, which for a
   small job means its stages in the driver: ``small_job_warm_runner``) and with its stages on
   Ray Data (``runner=ray``, ``small_job_seconds_warm_ray``).

The figures are printed one per line; the last line is one JSON object.
"""

from __future__ import annotations

import argparse

from pipeline.bench.throughput import benchmark


def main(argv: list[str] | None = None) -> dict:
    """Entrypoint: runs the benchmark; returns its figures (also printed, the last line as JSON)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1600)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--baseline-rows", type=int, default=64)
    parser.add_argument("--small-rows", type=int, default=120)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    return benchmark(args.rows, args.shards, args.baseline_rows, args.small_rows, list(args.overrides))


if __name__ == "__main__":
    main()
