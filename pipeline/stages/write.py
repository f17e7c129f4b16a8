"""Write stage: one Parquet file per input shard, complete, in input order, written atomically,
then its success marker.

A single writer actor gathers each shard's rows as they stream in (it knows every shard's row
count) and writes the shard as soon as its last row arrives, so finished shards are safe on
disk while the rest of the job runs. File names come from the input shard
(``{output}/{shard stem}.parquet``): the same input and config always give the same files.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from .. import io
from ..config import Config, config_hash
from ..metrics import Reporter
from ..preflight import marker_path
from .columns import INTERNAL_TYPES, OFFSET, OUTPUT_TYPES, SHARD
from .contract import Contract

SUMMARY_SCHEMA = pa.schema([
    ("shard", pa.string()), ("output", pa.string()), ("rows", pa.int64()),
    ("errors", pa.int64()), ("retrieved", pa.int64()), ("written_at", pa.float64()),
])


def shard_summary(shard: str, dest: str, rows: pa.Table) -> dict:
    """Counts recorded in a shard's marker and in the run manifest."""
    errors = pc.sum(rows.column("error").is_valid().cast(pa.int64())).as_py() or 0
    retrieved = pc.sum(pc.fill_null(rows.column("retrieved"), False).cast(pa.int64())).as_py() or 0
    return {"shard": shard, "output": dest, "rows": rows.num_rows, "errors": errors,
            "retrieved": retrieved, "written_at": time.time()}


def write_shard(rows: pa.Table, shard: str, output: str, config_hash: str) -> dict:
    """Write one shard's rows (sorted back into input order), then its marker (which records the
    config hash, so a resume into the same output with another config is refused); return its summary."""
    rows = rows.sort_by(OFFSET).drop_columns(list(INTERNAL_TYPES))
    dest = io.join(output, f"{io.shard_stem(shard)}.parquet")
    io.write_parquet_atomic(rows, dest)
    summary = shard_summary(shard, dest, rows)
    io.write_text(marker_path(output, shard), json.dumps({**summary, "config_hash": config_hash}))
    return summary


def writer_contract(cfg: Config) -> Contract:
    """The writer reads the bookkeeping columns and what a shard's summary counts."""
    return Contract("write", reads={SHARD: INTERNAL_TYPES[SHARD], OFFSET: INTERNAL_TYPES[OFFSET],
                                    "error": OUTPUT_TYPES["error"], "retrieved": OUTPUT_TYPES["retrieved"]})


class ShardWriter:
    """Callable class for ``map_batches`` (one replica): buffers rows per shard until the shard
    is complete, then writes it. Emits one summary row per shard written."""

    def __init__(self, cfg: Config, expected_rows: dict[str, int]):
        io.configure(cfg.storage)
        self.output, self.config_hash = cfg.output.path, config_hash(cfg)
        self.expected = dict(expected_rows)
        self.pending: dict[str, list[pa.Table]] = defaultdict(list)
        self.received: dict[str, int] = defaultdict(int)
        self.reporter = Reporter("write")

    def __call__(self, batch: pa.Table) -> pa.Table:
        written = []
        with self.reporter.batch(batch.num_rows):
            shards = batch.column(SHARD)
            for shard in pc.unique(shards).to_pylist():
                part = batch.filter(pc.equal(shards, shard))
                self.pending[shard].append(part)
                self.received[shard] += part.num_rows
                if self.received[shard] == self.expected[shard]:
                    written.append(write_shard(pa.concat_tables(self.pending.pop(shard)), shard, self.output,
                                               self.config_hash))
        return pa.Table.from_pylist(written, schema=SUMMARY_SCHEMA)
