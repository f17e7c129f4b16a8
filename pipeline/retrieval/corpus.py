"""Passage corpora: Parquet, JSON Lines, and the DPR TSV layout (id, text, title; with header).

Every reader yields the columns ``id`` (string), ``title`` and ``text``, in corpus order.
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from ..infra.io import Storage

CORPUS_COLUMNS = ("id", "title", "text")


def corpus_format(path: str) -> str:
    """parquet, jsonl or tsv, from the file name; ValueError for anything else."""
    name = path.rstrip("/").lower()
    for suffix, fmt in ((".parquet", "parquet"), (".jsonl", "jsonl"), (".json", "jsonl"), (".tsv", "tsv")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"corpus {path}: unknown format (expected .parquet, .jsonl/.json or .tsv)")


def normalize(table: pa.Table, source: str = "corpus") -> pa.Table:
    """The id, title and text columns as strings (id required; a missing title is empty)."""
    missing = [c for c in ("id", "text") if c not in table.column_names]
    if missing:
        raise ValueError(f"{source} lacks columns {missing} (has {table.column_names})")
    title = table.column("title") if "title" in table.column_names else pa.array([""] * table.num_rows)
    return pa.table({"id": pc.cast(table.column("id"), pa.string()),
                     "title": pc.cast(title, pa.string()), "text": pc.cast(table.column("text"), pa.string())})


def read_corpus(storage: Storage, path: str) -> pa.Table:
    """A whole corpus file as one table (for corpora that fit in memory)."""
    fmt = corpus_format(path)
    fs, p = storage.filesystem(path)
    with fs.open(p, "rb") as f:
        if fmt == "parquet":
            table = pq.read_table(f)
        elif fmt == "jsonl":
            table = pajson.read_json(f)
        else:
            table = pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter="\t"),
                                   convert_options=pacsv.ConvertOptions(column_types={"id": pa.string()}))
    return normalize(table, path)


def iter_corpus(storage: Storage, path: str, batch_rows: int = 65536) -> Iterator[pa.Table]:
    """The corpus as a stream of (id, title, text) tables, in corpus order: memory is bounded by
    a read block, not by the corpus (a Wikipedia TSV of 21M passages never sits in memory)."""
    fmt = corpus_format(path)
    fs, p = storage.filesystem(path)
    with fs.open(p, "rb") as f:
        if fmt == "parquet":
            parquet = pq.ParquetFile(f)
            batches = parquet.iter_batches(batch_size=batch_rows, columns=[
                c for c in CORPUS_COLUMNS if c in parquet.schema_arrow.names])
        elif fmt == "jsonl":
            batches = pajson.open_json(f)
        else:  # every column a string: a block of numeric-looking titles must not fix the type
            batches = pacsv.open_csv(f, parse_options=pacsv.ParseOptions(delimiter="\t"),
                                     convert_options=pacsv.ConvertOptions(
                                         column_types={c: pa.string() for c in CORPUS_COLUMNS}))
        for batch in batches:
            yield normalize(pa.Table.from_batches([batch]), path)


def corpus_dataset(storage: Storage, path: str):
    """The corpus as a Ray dataset of (id, title, text), in file order."""
    import ray
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fmt = corpus_format(path)
    fs, p = storage.filesystem(path)
    arrow_fs = PyFileSystem(FSSpecHandler(fs))
    if fmt == "parquet":
        ds = ray.data.read_parquet(p, filesystem=arrow_fs)
    elif fmt == "jsonl":
        ds = ray.data.read_json(p, filesystem=arrow_fs)  # Arrow reads JSON Lines
    else:
        ds = ray.data.read_csv(p, filesystem=arrow_fs, parse_options=pacsv.ParseOptions(delimiter="\t"),
                               convert_options=pacsv.ConvertOptions(column_types={"id": pa.string()}))
    return ds.map_batches(normalize, batch_format="pyarrow")
