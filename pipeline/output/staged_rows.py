"""Staged rows: a shard's annotated rows kept at the output location, in parts, until the
shard is complete and committed as one file.

Parts live under ``{output}/_staging/{annotation hash}/{shard stem}/`` (a ``_`` directory:
readers and Ray Data skip it). Each part holds rows of one *bucket*, a fixed range of input
offsets (``bucket = offset // stage_rows``), so a commit reads one bucket at a time and
writes the shard in input order with the memory of one bucket, whatever the shard's size.
A part's name records its bucket and the ``stage_rows`` it was cut with; a commit first re-cuts
the parts staged with another ``stage_rows`` (a resume with another ``output.stage_rows``:
``rebucket``), so that bucket numbers mean one range of offsets and the shard stays in input order.
Parts are written atomically and carry the bookkeeping columns, so a later run (a resume)
knows which offsets are staged and annotates only the others. ``_input.json`` beside them
records the version of the input shard they annotate; a resume discards staged rows of a
shard replaced since (``discard_if_changed``). A committed shard's success marker is
``OutputFolder.marker`` (under ``{output}/_done/``).
"""

from __future__ import annotations

import posixpath
import re
import uuid
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..infra.io import join
from .folder import OutputFolder
from .schema import OFFSET

_WIDTH_RE = re.compile(r"^b\d{7}-w(\d+)-")


def part_name(bucket: int, stage_rows: int) -> str:
    """A new part's file name: its bucket, the ``stage_rows`` that numbers it, then a unique
    suffix (parts of one bucket accumulate)."""
    return f"b{bucket:07d}-w{stage_rows}-{uuid.uuid4().hex[:12]}.parquet"


def part_width(path: str) -> int | None:
    """The ``stage_rows`` a part was cut with (None for a part named before it was recorded)."""
    match = _WIDTH_RE.match(posixpath.basename(path))
    return int(match.group(1)) if match else None


def list_parts(output: OutputFolder, annotation_hash: str, shard: str) -> dict[int, list[str]]:
    """The shard's staged parts by bucket (temporary files of unfinished writes left out)."""
    fs, root = output.storage.filesystem(output.staged_shard_dir(annotation_hash, shard))
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return {}
    parts: dict[int, list[str]] = defaultdict(list)
    for path in sorted(fs.find(root)):
        name = posixpath.basename(path)
        if name.startswith("b") and name.endswith(".parquet"):
            parts[int(name[1:8])].append(path)
    return dict(parts)


def read_part(output: OutputFolder, path: str, columns: list[str] | None = None) -> pa.Table:
    """One staged part (``path`` as ``list_parts`` gives it, on the output's filesystem)."""
    fs, _ = output.storage.filesystem(output.path)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def staged_offsets(output: OutputFolder, annotation_hash: str, shard: str) -> np.ndarray:
    """The input offsets of a shard already staged (sorted, unique)."""
    found = [read_part(output, p, [OFFSET]).column(OFFSET).to_numpy()
             for paths in list_parts(output, annotation_hash, shard).values() for p in paths]
    return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)


def stage(rows: pa.Table, output: OutputFolder, annotation_hash: str, shard: str, stage_rows: int) -> None:
    """Write a shard's rows as staged parts, one per bucket they fall in."""
    buckets = pc.divide(rows.column(OFFSET), stage_rows)
    for bucket in pc.unique(buckets).to_pylist():
        part = rows.filter(pc.equal(buckets, bucket))
        output.storage.write_parquet_atomic(
            part, join(output.staged_shard_dir(annotation_hash, shard), part_name(bucket, stage_rows)))


def rebucket(output: OutputFolder, annotation_hash: str, shard: str, stage_rows: int) -> int:
    """Re-cut the shard's parts staged with another ``stage_rows`` into this one's buckets (one
    part in memory at a time; each new part is written before the old one is deleted, and a
    row found twice counts once at the commit). A part named before widths were recorded is
    re-cut only if its offsets leave its bucket. Returns the number of parts re-cut."""
    fs, _ = output.storage.filesystem(output.path)
    recut = 0
    for bucket, paths in list_parts(output, annotation_hash, shard).items():
        for path in paths:
            width = part_width(path)
            if width == stage_rows:
                continue
            if width is None:
                offsets = read_part(output, path, [OFFSET]).column(OFFSET).to_numpy()
                if (offsets // stage_rows == bucket).all():
                    continue
            stage(read_part(output, path), output, annotation_hash, shard, stage_rows)
            fs.rm(path)
            recut += 1
    return recut


def record_version(output: OutputFolder, annotation_hash: str, shard: str, version: dict) -> None:
    """Record which version of the input shard (``Storage.file_version``) the staged rows annotate."""
    output.write_json(output.staged_version(annotation_hash, shard), version)


def discard_if_changed(output: OutputFolder, annotation_hash: str, shard: str, version: dict | None) -> bool:
    """Delete the shard's staged rows unless they annotate this ``version`` of it (staged rows
    with no recorded version are deleted too); returns whether any were deleted."""
    if not list_parts(output, annotation_hash, shard):
        return False
    recorded = output.read_json(output.staged_version(annotation_hash, shard))
    if recorded is not None and recorded == version:
        return False
    remove_shard(output, annotation_hash, shard)
    return True


def bucket_rows(output: OutputFolder, paths: list[str], held: list[pa.Table]) -> pa.Table | None:
    """A bucket's rows, from its staged parts and the rows still held in memory, in input order,
    each offset once (a row staged twice, by a retried task, counts once)."""
    tables = [read_part(output, p) for p in paths] + held
    if not tables:
        return None
    rows = pa.concat_tables(tables, promote_options="permissive").sort_by(OFFSET)
    offsets = rows.column(OFFSET).to_numpy()
    if len(offsets) > 1 and (offsets[1:] == offsets[:-1]).any():
        keep = np.concatenate([[True], offsets[1:] != offsets[:-1]])
        rows = rows.filter(pa.array(keep))
    return rows


def remove_shard(output: OutputFolder, annotation_hash: str, shard: str) -> None:
    """Delete a committed shard's staged parts."""
    fs, root = output.storage.filesystem(output.staged_shard_dir(annotation_hash, shard))
    if fs.exists(root):
        fs.rm(root, recursive=True)


def remove_other_identities(output: OutputFolder, annotation_hash: str | None) -> list[str]:
    """Delete staged rows of any other annotation identity (they can never be committed: a
    resume needs the same identity); ``None``: delete all. Returns the hashes removed."""
    fs, root = output.storage.filesystem(output.staging_dir)
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return []
    removed = []
    for path in fs.ls(root, detail=False):
        name = posixpath.basename(path.rstrip("/"))
        if name != annotation_hash:
            fs.rm(path, recursive=True)
            removed.append(name)
    return removed
