"""Write stage: each input shard becomes one Parquet file, complete, in input order, committed
atomically, then its success marker.

One writer actor sees every row, so it knows when a shard is complete. It holds at most
``output.buffer_rows`` rows in memory: beyond that, and every ``output.flush_s`` seconds, it
stages rows to the output location (``pipeline.output.staged_rows``). A shard is committed when all its
rows are staged or held: its buckets are read one at a time and streamed into one hidden
file, which is then moved into place (``{output}/{shard stem}.parquet``), and only then is
the marker written. The writer's memory is bounded by the buffer and one bucket, whatever the
shard's size; a writer or driver that dies loses at most the rows it held, and a resume
annotates only the rows not staged.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..infra.io import make_parent, replacing
from ..runtime import phases
from ..output import staged_rows
from ..infra.config import Config
from ..output.folder import OutputFolder
from ..runtime.metrics_actor import Reporter
from .columns import INTERNAL_TYPES, OFFSET, OUTPUT_TYPES, SHARD
from .contract import Contract

SUMMARY_SCHEMA = pa.schema([
    ("shard", pa.string()), ("output", pa.string()), ("rows", pa.int64()),
    ("errors", pa.int64()), ("retrieved", pa.int64()), ("written_at", pa.float64()),
])


def _count(rows: pa.Table) -> tuple[int, int]:
    """(error rows, rows that retrieved) of some output rows."""
    errors = pc.sum(rows.column("error").is_valid().cast(pa.int64())).as_py() or 0
    retrieved = pc.sum(pc.fill_null(rows.column("retrieved"), False).cast(pa.int64())).as_py() or 0
    return errors, retrieved


def commit_shard(output: OutputFolder, annotation_hash: str, shard: str, expected: int,
                 held: dict[int, list[pa.Table]] | None = None, version: dict | None = None, *,
                 stage_rows: int, identity: dict | None = None) -> dict:
    """Write a complete shard from its staged parts and the rows ``held`` in memory (by bucket of
    ``stage_rows`` offsets), bucket by bucket, in input order, to a hidden file moved into place;
    then its marker (with the annotation hash, the annotation ``identity`` it stands for, so that
    a refused resume can name what changed, and the input shard's ``version``); then drop its
    staged parts. Parts staged with another ``stage_rows`` (by an earlier run) are re-cut first.
    Returns its summary. Raises RuntimeError, exposing nothing, when the rows do not number
    ``expected``."""
    held = held or {}
    staged_rows.rebucket(output, annotation_hash, shard, stage_rows)
    parts = staged_rows.list_parts(output, annotation_hash, shard)
    dest = output.shard_file(shard)
    fs, path = output.storage.filesystem(dest)
    make_parent(fs, path)
    rows = errors = retrieved = 0
    with replacing(fs, path) as tmp, fs.open(tmp, "wb") as f:  # a failed write leaves no partial file
        writer = None
        for bucket in sorted(set(parts) | set(held)):
            table = staged_rows.bucket_rows(output, parts.get(bucket, []), held.get(bucket, []))
            table = table.drop_columns([c for c in INTERNAL_TYPES if c in table.column_names])
            if writer is None:
                writer = pq.ParquetWriter(f, table.schema)
            writer.write_table(table.cast(writer.schema))
            rows += table.num_rows
            e, r = _count(table)
            errors, retrieved = errors + e, retrieved + r
            del table
            pa.default_memory_pool().release_unused()  # one bucket's buffers at a time, not all of them
        if writer is not None:
            writer.close()
        phases.reached("commit")  # test hook: the hidden file is written, not yet moved into place
        if rows != expected or writer is None:  # raised inside: the temporary file goes
            raise RuntimeError(f"shard {shard}: {rows} rows staged, {expected} expected; not committed")
    summary = {"shard": shard, "output": dest, "rows": rows, "errors": errors, "retrieved": retrieved,
               "written_at": time.time()}
    marker = {**summary, "annotation_hash": annotation_hash,
              **({"annotation_identity": identity} if identity is not None else {}),
              **({"input": version} if version else {})}
    output.write_json(output.marker(shard), marker)
    staged_rows.remove_shard(output, annotation_hash, shard)
    return summary


def writer_contract(cfg: Config) -> Contract:
    """The writer reads the bookkeeping columns and what a shard's summary counts."""
    return Contract("write", reads={SHARD: INTERNAL_TYPES[SHARD], OFFSET: INTERNAL_TYPES[OFFSET],
                                    "error": OUTPUT_TYPES["error"], "retrieved": OUTPUT_TYPES["retrieved"]})


@dataclass
class _Shard:
    """What the writer knows of one shard: which offsets it has (staged or held), and the held rows."""

    seen: np.ndarray
    count: int
    held: dict[int, list[pa.Table]] = field(default_factory=lambda: defaultdict(list))
    held_rows: int = 0


class ShardWriter:
    """Callable class for ``map_batches`` (one replica): holds or stages rows per shard until the
    shard is complete, then commits it. Emits one summary row per shard committed. Its output
    is the run's (``OutputFolder.of(cfg)``: ``output.path`` with the run's storage options)."""

    def __init__(self, cfg: Config, expected_rows: dict[str, int], annotation_hash: str,
                 versions: dict[str, dict] | None = None, identity: dict | None = None):
        out = cfg.output
        self.output, self.hash = OutputFolder.of(cfg), annotation_hash
        self.stage_rows, self.buffer_rows, self.flush_s = out.stage_rows, out.buffer_rows, out.flush_s
        self.expected = dict(expected_rows)
        self.versions = versions or {}  # the input shards' versions, recorded with their staged rows and marker
        self.identity = identity  # the annotation identity of ``annotation_hash``, recorded in the markers
        self.recorded: set[str] = set()
        self.shards: dict[str, _Shard] = {}
        self.committed: set[str] = set()
        self.held = 0
        self.last_flush = time.monotonic()
        self.reporter = Reporter("write")

    def _shard(self, shard: str) -> _Shard:
        if shard not in self.shards:  # first sight (also after a restart): what is staged already
            seen = np.zeros(self.expected[shard], bool)
            seen[staged_rows.staged_offsets(self.output, self.hash, shard)] = True
            self.shards[shard] = _Shard(seen, int(seen.sum()))
        return self.shards[shard]

    def _hold(self, state: _Shard, rows: pa.Table) -> None:
        buckets = pc.divide(rows.column(OFFSET), self.stage_rows)
        for bucket in pc.unique(buckets).to_pylist():
            state.held[bucket].append(rows.filter(pc.equal(buckets, bucket)))
        state.held_rows += rows.num_rows
        self.held += rows.num_rows

    def _spill(self, shard: str) -> None:
        state = self.shards[shard]
        if state.held_rows:
            if shard not in self.recorded and shard in self.versions:  # before the first part of this writer
                staged_rows.record_version(self.output, self.hash, shard, self.versions[shard])
                self.recorded.add(shard)
            staged_rows.stage(pa.concat_tables([t for ts in state.held.values() for t in ts]), self.output, self.hash,
                          shard, self.stage_rows)
            self.held -= state.held_rows
            state.held, state.held_rows = defaultdict(list), 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        written = []
        with self.reporter.batch(batch.num_rows):
            shards = batch.column(SHARD)
            for shard in pc.unique(shards).to_pylist():
                if shard in self.committed:  # rows sent again after their shard was committed
                    continue
                state = self._shard(shard)
                rows = batch.filter(pc.equal(shards, shard))
                offsets = rows.column(OFFSET).to_numpy()
                _, first = np.unique(offsets, return_index=True)
                new = np.zeros(len(offsets), bool)
                new[first] = ~state.seen[offsets[first]]  # a row sent again (a retried task) counts once
                if new.any():
                    state.seen[offsets[new]] = True
                    state.count += int(new.sum())
                    self._hold(state, rows.filter(pa.array(new)))
                if state.count == len(state.seen):
                    written.append(commit_shard(self.output, self.hash, shard, len(state.seen), state.held,
                                                self.versions.get(shard), stage_rows=self.stage_rows,
                                                identity=self.identity))
                    self.held -= state.held_rows
                    del self.shards[shard]
                    self.committed.add(shard)
            if time.monotonic() - self.last_flush > self.flush_s:
                for shard in list(self.shards):
                    self._spill(shard)
                self.last_flush = time.monotonic()
            while self.held > self.buffer_rows:  # the shards holding most rows go to storage first
                self._spill(max(self.shards, key=lambda s: self.shards[s].held_rows))
        if written or self.held == 0:
            pa.default_memory_pool().release_unused()  # give freed buffers back: a long run's memory stays flat
        return pa.Table.from_pylist(written, schema=SUMMARY_SCHEMA)
