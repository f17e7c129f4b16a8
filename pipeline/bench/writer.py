"""The shard writer's peak memory against shard size (``make bench-writer``; what it measures:
``python -m jobs.bench_writer --help``). Each size runs in a fresh process
(``python -m jobs.bench_writer --one ROWS``, which calls ``measure``)."""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
import tempfile
import time

BATCH, WINDOW = 32, 64
SHARD = "bench/part-0.parquet"


def annotated_batch(offsets: list[int]):
    """``mode=never`` rows for these offsets: a question, its prompt and token ids, an answer."""
    import pyarrow as pa

    from ..infra.config import InputConfig
    from ..stages.columns import OFFSET, PROMPT_IDS
    from ..stages.prepare import prepare_table

    questions = [f"Question {o}: who founded the company that makes product {o % 997}?" for o in offsets]
    rows = prepare_table(pa.table({"instruction": questions}), SHARD, InputConfig(), "models/tiny-selfrag", "bench")
    n = rows.num_rows
    values = {
        OFFSET: pa.array(offsets, pa.int64()),
        "id": pa.array([f"part-0:{o}" for o in offsets]),
        PROMPT_IDS: pa.array([list(range(40))] * n, pa.list_(pa.int32())),
        "answer": pa.array([f"The founder of company {o % 997} is someone with a fairly long name. " * 3
                            for o in offsets]),
        "retrieved": pa.array([False] * n),
    }
    for name, column in values.items():
        rows = rows.set_column(rows.column_names.index(name), name, column)
    return rows


def measure(rows: int, overrides: list[str]) -> dict:
    """Feed one shard of ``rows`` rows to a writer in this process; its peak memory and time."""
    from ..infra.config import load_config
    from ..stages.write import ShardWriter

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config([], [f"output.path={out}", *overrides])
        writer = ShardWriter(cfg, {SHARD: rows}, "bench")
        annotated_batch([0])  # imports and first-call allocations belong to the baseline
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        starts = list(range(0, rows, BATCH))
        rng = random.Random(0)
        start, written = time.time(), []
        for w in range(0, len(starts), WINDOW):
            window = starts[w:w + WINDOW]
            rng.shuffle(window)
            for s in window:
                written += writer(annotated_batch(list(range(s, min(s + BATCH, rows))))).to_pylist()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert [w["rows"] for w in written] == [rows], written
    return {"rows": rows, "peak_mib_above_baseline": round((peak - baseline) / 1024, 1),
            "baseline_mib": round(baseline / 1024, 1), "seconds": round(time.time() - start, 1),
            "buffer_rows": cfg.output.buffer_rows, "stage_rows": cfg.output.stage_rows}


def benchmark(sizes: list[int], overrides: list[str]) -> dict:
    """Measure each shard size of ``sizes`` in its own process, with the config ``overrides``;
    prints a line per size, then the figures as JSON, and returns them."""
    results = []
    for rows in sizes:
        child = subprocess.run([sys.executable, "-m", "jobs.bench_writer", "--one", str(rows), *overrides],
                               capture_output=True, text=True, check=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"{rows} rows: writer peak {result['peak_mib_above_baseline']} MiB above a baseline of "
              f"{result['baseline_mib']} MiB, {result['seconds']} s", flush=True)
    figures = {"writer_peak_mib": {str(r["rows"]): r["peak_mib_above_baseline"] for r in results}, "results": results}
    print(json.dumps(figures))
    return figures
