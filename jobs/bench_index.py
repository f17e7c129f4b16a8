"""Benchmark of the index build and of search at corpus scale.

    python -m jobs.bench_index [--passages 200000] [--queries 1000]

1. Generates a synthetic corpus of short encyclopedia-style passages (invented names).
2. Runs the index-build job (Ray Data embedding pool, exact Flat index): embedding throughput,
   build time, and the driver's peak memory.
3. Builds IVF-PQ and HNSW indexes from the same vectors (each in a fresh process, to measure
   its peak memory), and measures batched search throughput and recall@10 against Flat on
   encoded questions about the corpus.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.bench.index import OUT, benchmark


def main(argv: list[str] | None = None) -> dict:
    """Entrypoint: runs the benchmark; returns its figures (also printed, the last line as JSON)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--embed-threads", type=int, default=2, help="torch threads of the embedding replica")
    parser.add_argument("--out", type=Path, default=OUT, help="working directory (corpus, indexes, vectors)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the corpus, Flat index and vectors of the previous run (skip embedding)")
    args = parser.parse_args(argv)
    return benchmark(args.passages, args.queries, args.embed_threads, args.out, args.reuse)


if __name__ == "__main__":
    main()
