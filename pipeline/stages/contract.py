"""Stage contracts: the columns each stage reads and writes, with their types.

A stage sees a batch only through ``Contract.view``: reading a column it did not declare, or
one the batch lacks, raises ``ContractError`` (never a column of nulls), and it may only
write the columns it declared, with their declared types. The one exception is declared on
purpose: the optional input columns (input text, task, ctxs) a stage lists in ``optional``
read as nulls when the input data has no such column. ``check_chain`` checks a whole
dataflow when it is built: every column a stage reads was written earlier (or is an input
column), with the type the stage expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc


class ContractError(KeyError):
    """A stage read or wrote a column outside its contract, or a dataflow's stages do not chain."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


#: Declared type of a column whose type comes from the input data (any type is accepted).
ANY = None


@dataclass(frozen=True)
class Contract:
    """What one stage reads and writes (``reads``: name -> type or ``ANY``)."""

    stage: str
    reads: Mapping[str, pa.DataType | None]
    writes: Mapping[str, pa.DataType] = field(default_factory=dict)
    #: Read columns that may be absent from the input altogether (then they read as nulls).
    optional: frozenset = frozenset()

    def view(self, table: pa.Table) -> "BatchView":
        """A view of a batch that enforces this contract."""
        return BatchView(self, table)


class BatchView:
    """A batch as a stage may see it: declared columns only."""

    def __init__(self, contract: Contract, table: pa.Table):
        self.contract, self.table = contract, table
        self._updates: dict[str, list] = {}

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def __getitem__(self, name: str) -> list:
        """A declared column as Python values (a copy: change it and ``set`` it back)."""
        if name in self._updates:
            return list(self._updates[name])
        column = self._column(name)
        return [None] * self.num_rows if column is None else column.to_pylist()

    def _column(self, name: str) -> pa.ChunkedArray | None:
        """A declared column of the batch (None: an optional column the input lacks)."""
        c = self.contract
        if name not in c.reads and name not in c.writes:
            raise ContractError(f"stage '{c.stage}' reads column '{name}', which its contract does not declare")
        if name not in self.table.column_names:
            if name in c.optional:
                return None
            raise ContractError(f"stage '{c.stage}' reads column '{name}', which the batch lacks "
                                f"(columns: {self.table.column_names})")
        return self.table.column(name)

    def non_empty(self, name: str) -> list[bool]:
        """Whether each row's value of a declared column is non-null and non-empty, read from
        Arrow (a list column's lengths) without turning the values into Python objects."""
        column = None if name in self._updates else self._column(name)
        if column is None:
            return [bool(v) for v in self[name]]
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            lengths = pc.fill_null(pc.list_value_length(column), 0)
            return [n > 0 for n in lengths.to_pylist()]
        return [bool(v) for v in column.to_pylist()]

    def set(self, **columns: Sequence[Any]) -> None:
        """Replace declared output columns (applied by ``result``)."""
        for name, values in columns.items():
            if name not in self.contract.writes:
                raise ContractError(f"stage '{self.contract.stage}' writes column '{name}', "
                                    "which its contract does not declare")
            if len(values) != self.num_rows:
                raise ValueError(f"column '{name}': {len(values)} values for {self.num_rows} rows")
            self._updates[name] = list(values)

    def result(self) -> pa.Table:
        """The batch with the written columns, in their declared types (appended if new)."""
        table = self.table
        for name, values in self._updates.items():
            array = pa.array(values, type=self.contract.writes[name])
            index = table.schema.get_field_index(name)
            table = table.set_column(index, name, array) if index >= 0 else table.append_column(name, array)
        return table


def check_chain(source: Mapping[str, pa.DataType], contracts: Iterable[Contract]) -> dict[str, pa.DataType]:
    """Check that ``contracts``, in order, chain from the ``source`` columns: each stage reads
    only columns available before it, with the declared type; returns the final columns.
    Raises ContractError naming the stage and the column."""
    available = dict(source)
    for c in contracts:
        for name, wanted in c.reads.items():
            if name not in available and name in c.optional:
                continue
            if name not in available:
                raise ContractError(f"stage '{c.stage}' reads column '{name}', which no earlier stage writes "
                                    f"and the input lacks")
            if wanted is not ANY and available[name] is not ANY and available[name] != wanted:
                raise ContractError(f"stage '{c.stage}' reads column '{name}' as {wanted}, "
                                    f"but it is {available[name]}")
        for name, typ in c.writes.items():
            if name in available and available[name] is not ANY and available[name] != typ:
                raise ContractError(f"stage '{c.stage}' writes column '{name}' as {typ}, "
                                    f"but it is already {available[name]}")
            available[name] = typ
    return available
