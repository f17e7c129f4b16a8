"""Benchmark of scale-out: the harness against K = 1, 2, 4, 8 simulated GPU engine replicas.

    python -m jobs.bench_scale [--rows 1600] [--replicas 1,2,4,8] [--nodes 4] [key=value ...]

1. The real engine's outputs for the benchmark workload (``pipeline.bench.workload``): the
   recording ``make bench`` leaves in ``outputs/bench/engine-requests`` when it covers these
   rows, else one real-engine run here that records them.
2. A local multi-node Ray cluster (``ray.cluster_utils.Cluster``): a head node for the driver,
   the stage actors and the retriever, and ``--nodes`` nodes of 2 (logical) GPUs each, so
   engine replicas (one GPU each) spread over the nodes.
3. For each K, K simulated engine replicas (``engine.simulated``: the recorded outputs, after
   the latency model's time; see ``pipeline.services.simulated_engine``) and the retriever
   deployed and warmed up, as ``jobs.serve`` keeps them on a cluster, then the annotation job
   on the same rows reusing them, its stages on Ray Data (``runner=ray``). Per K: rows/s over the rows' window (the job's
   first batch in a model stage to its last row written), the efficiency rows/s(K) /
   (K x rows/s(1)), the harness's mean cores over the window (every process except the engine
   replicas: stage actors, retriever, Ray, Serve, the driver), how busy the harness kept the
   replicas (``engine_busy``: the latency model's seconds of work, steps and uncached prefill,
   over K x the window; ``engine_batch_fill``: running sequences per step over
   ``max_num_seqs``), and how many selected answers equal the real-engine run's.
4. The latency model honoured: one simulated replica in this process gets the first
   ``--check-prompts`` recorded prompts at once; ``latency_model_ratio`` = its measured seconds
   over the model's arithmetic (``predicted_seconds``).

The figures are printed one per line; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import signal

from pipeline.bench import scale
from pipeline.runtime import main_stop


def main(argv: list[str] | None = None) -> dict:
    """Entrypoint: runs the benchmark; returns its figures (also printed, the last line as JSON)."""
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
    try:
        return scale.benchmark(args.rows, args.shards, ks, args.nodes, args.check_prompts, list(args.overrides))
    except KeyboardInterrupt as exc:  # SIGTERM or SIGINT, in the benchmark or in a job's run: 128 + its number
        cause = main_stop.reason(exc)
        if isinstance(cause, SystemExit):
            raise cause
        raise SystemExit(128 + getattr(cause, "signum", signal.SIGINT)) from exc


if __name__ == "__main__":
    main()
