"""Write stage: one Parquet file per input shard, rows in input order, written atomically.

File names come from the input shard (``{output}/{shard stem}.parquet``), so the same input
and config always give the same files and a rerun overwrites instead of duplicating.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from ..io import join, shard_stem, write_parquet_atomic
from ..metrics import Reporter
from .columns import INTERNAL_TYPES, OFFSET, SHARD


def write_shard(group: pa.Table, output: str) -> pa.Table:
    """Write one shard's rows (a ``map_groups`` group) and return its summary row."""
    shard = group.column(SHARD)[0].as_py()
    rows = group.sort_by(OFFSET).drop_columns(list(INTERNAL_TYPES))
    dest = join(output, f"{shard_stem(shard)}.parquet")
    with Reporter("write").batch(rows.num_rows):
        write_parquet_atomic(rows, dest)
    errors = rows.column("error").is_valid()
    retrieved = pc.fill_null(rows.column("retrieved"), False)
    return pa.table({
        "shard": [shard], "output": [dest], "rows": [rows.num_rows],
        "errors": [pc.sum(errors.cast(pa.int64())).as_py() or 0],
        "retrieved": [pc.sum(retrieved.cast(pa.int64())).as_py() or 0],
    })
