"""The output columns every stage reads and writes, with fixed Arrow types (defined in
``pipeline.output.schema``), and the helpers the stages set and read them with.

The prepare stage adds all of them (as nulls) so that every block has the same schema, and
later stages only replace values.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pyarrow as pa

from ..output.schema import (
    ALL_TYPES,
    CANDIDATE_TYPE,
    F64,
    INTERNAL_TYPES,
    OFFSET,
    OUTPUT_TYPES,
    PASSAGE_TYPE,
    PROMPT_IDS,
    SEGMENT_TYPE,
    SHARD,
)

#: The schema's names are re-exported: the stages import the columns from here.
__all__ = ["ALL_TYPES", "CANDIDATE_TYPE", "F64", "INTERNAL_TYPES", "OFFSET", "OUTPUT_TYPES", "PASSAGE_TYPE",
           "PROMPT_IDS", "SEGMENT_TYPE", "SHARD", "optional_column", "set_columns"]


def set_columns(table: pa.Table, values: Mapping[str, Sequence[Any]]) -> pa.Table:
    """Replace (or append) output columns with Python values, using their fixed types."""
    for name, column in values.items():
        array = pa.array(list(column), type=ALL_TYPES[name])
        idx = table.schema.get_field_index(name)
        table = table.set_column(idx, name, array) if idx >= 0 else table.append_column(name, array)
    return table


def optional_column(table: pa.Table, name: str) -> list:
    """An optional input column (input text, task, ctxs) as Python values, or Nones when the
    input has no such column. Stages read columns through their contract (``contract.py``)."""
    if name in table.column_names:
        return table.column(name).to_pylist()
    return [None] * table.num_rows
