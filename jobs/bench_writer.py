"""Peak memory of the shard writer against shard size (``mode=never`` rows, out of order).

    python -m jobs.bench_writer [--rows 20000 200000] [key=value ...]

Each size runs in a fresh process: a ``ShardWriter`` (the write stage's actor class, with the
config's ``output.buffer_rows`` / ``stage_rows``) receives one shard's annotated rows in
batches of 32 that arrive shuffled within windows of 64 batches, as they do from a stream of
actor pools, and commits the shard to a temporary output. The rows are made batch by batch,
so the process holds no copy of the shard. Prints one line per size, then one JSON object:
the writer's peak resident memory above the process's baseline, per size.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.bench.writer import benchmark, measure


def main(argv: list[str] | None = None) -> int:
    """Run each size in its own process and print the figures (last line: JSON)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_writer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[20000, 200000], help="shard sizes")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: one size
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (output.*)")
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.one, args.overrides)))
        return 0
    benchmark(args.rows, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
