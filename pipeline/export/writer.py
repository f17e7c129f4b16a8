"""Output files of an export: one Parquet and/or JSON Lines file per dataset, split and shard,
``{output}/{kind}/{split}/{shard stem}.{parquet,jsonl}``, written atomically."""

from __future__ import annotations

import json

import pyarrow as pa

from ..infra.io import Storage, join

_STR = pa.string()
SCHEMAS = {
    "generator": pa.schema([("instruction", _STR), ("input", _STR), ("output", _STR), ("id", _STR),
                            ("dataset_name", _STR)]),
    "critic": pa.schema([("id", _STR), ("source_id", _STR), ("instruction", _STR), ("input", _STR),
                         ("aspect", _STR), ("label", _STR), ("probability", pa.float64()), ("score", pa.float64()),
                         ("evidence", _STR), ("output", _STR), ("dataset_name", _STR)]),
    "chat": pa.schema([("id", _STR),
                       ("messages", pa.list_(pa.struct([("role", _STR), ("content", _STR)]))),
                       ("references", pa.list_(pa.struct([("n", pa.int32()), ("id", _STR), ("title", _STR),
                                                          ("text", _STR)]))),
                       ("dataset_name", _STR)]),
}
EXTENSIONS = {"parquet": "parquet", "jsonl": "jsonl"}


def file_path(output: str, kind: str, split: str, stem: str, fmt: str) -> str:
    """Where one dataset's split of one shard goes."""
    return join(output, kind, split, f"{stem}.{EXTENSIONS[fmt]}")


def write_records(storage: Storage, records: list[dict], output: str, kind: str, split: str, stem: str,
                  formats: list[str]) -> list[str]:
    """Write ``records`` in each format (nothing for no records); returns the files written."""
    if not records:
        return []
    written = []
    for fmt in formats:
        dest = file_path(output, kind, split, stem, fmt)
        if fmt == "parquet":
            storage.write_parquet_atomic(pa.Table.from_pylist(records, schema=SCHEMAS[kind]), dest)
        else:
            storage.write_text(dest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        written.append(dest)
    return written
