"""Prepare stage (CPU tasks): read a shard, give every row its id, bookkeeping and output
columns, validate the question, format the Self-RAG prompt and tokenize it (once, with
special-token parsing off). A bad row gets ``error`` set, never dropped."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from ..output import staged_rows
from ..infra.config import Config, InputConfig, SelfRagConfig
from ..infra.io import shard_stem
from ..output.folder import OutputFolder
from ..runtime.metrics_actor import Reporter
from ..selfrag.prompts import PromptTokens, format_prompt
from ..model.tokenizer import TokenizerSpec, spec_tokens
from .columns import INTERNAL_TYPES, OFFSET, OUTPUT_TYPES, PROMPT_IDS, SHARD, optional_column, set_columns
from .contract import ANY, Contract


def row_prompt(question, input_text, task, selfrag: SelfRagConfig) -> tuple[str | None, str | None]:
    """(prompt, error) for one row's question, optional input and task, in the configured
    prompt style (a row decoded long-form gets the long-form template)."""
    if question is None:
        return None, "question is null"
    if not isinstance(question, str):
        return None, f"question is not a string (got {type(question).__name__})"
    if not question.strip():
        return None, "question is empty"
    if input_text is not None and not isinstance(input_text, str):
        return None, f"input is not a string (got {type(input_text).__name__})"
    if task is not None and not isinstance(task, str):
        return None, f"task is not a string (got {type(task).__name__})"
    try:
        return format_prompt(question, input_text, task, selfrag.prompt_style, selfrag.long_form.covers(task)), None
    except ValueError as exc:
        return None, str(exc)


def _readable(value: pa.Array) -> bool:
    try:
        value.to_pylist()  # decodes every string in it, nested ones too
        return True
    except UnicodeDecodeError:
        return False


def repair_text(table: pa.Table) -> tuple[pa.Table, list[str | None]]:
    """Values holding invalid UTF-8 made readable, and per row the error that names the columns
    where it had such values (None for a clean row). A string value is decoded with U+FFFD for
    the bad bytes (so the row can still be found), a nested value (e.g. ``ctxs``) becomes null.
    Valid Parquet can hold such bytes; one bad value must cost its row only."""
    errors: list[str | None] = [None] * table.num_rows
    for index, name in enumerate(table.column_names):
        column = table.column(index)
        try:
            column.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        values = column.combine_chunks()
        if pa.types.is_dictionary(values.type):  # the values themselves (a categorical's categories)
            values = values.dictionary_decode()
        bad = [i for i in range(len(values)) if not _readable(values.slice(i, 1))]
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            raw = values.cast(pa.large_binary() if pa.types.is_large_string(values.type) else pa.binary())
            fixed = pa.array([None if v is None else v.decode("utf-8", "replace") for v in raw.to_pylist()],
                             values.type)
        else:
            bad_rows = set(bad)
            fixed = pa.concat_arrays([pa.nulls(1, values.type) if i in bad_rows else values.slice(i, 1)
                                      for i in range(len(values))])
        table = table.set_column(index, table.field(index).with_type(fixed.type), fixed)
        for i in bad:
            errors[i] = (f"{errors[i]}, " if errors[i] else "invalid UTF-8 in column ") + repr(name)
    return table, errors


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """The table with exactly the columns of ``schema``, in its order and types (absent ones null),
    so that blocks of different shards can be concatenated."""
    arrays = [table.column(f.name).cast(f.type) if f.name in table.column_names
              else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def derived_id(shard: str, offset: int) -> str:
    """The id of a row that has none: ``"<shard stem>:<row offset>"``."""
    return f"{shard_stem(shard)}:{offset}"


def with_ids(table: pa.Table, shard: str, id_column: str) -> pa.Table:
    """The table with every row's id: a missing id column, or a null id, is derived."""
    n = table.num_rows
    if id_column not in table.column_names:
        return table.append_column(id_column, pa.array([derived_id(shard, i) for i in range(n)], pa.string()))
    ids = table.column(id_column)
    if ids.null_count == 0:
        return table
    filled = [derived_id(shard, i) if v is None else str(v) for i, v in enumerate(ids.to_pylist())]
    return table.set_column(table.schema.get_field_index(id_column), id_column, pa.array(filled, pa.string()))


def prepare_table(table: pa.Table, shard: str, cfg: InputConfig, model: str, run_id: str,
                  schema: pa.Schema | None = None, tokens: PromptTokens | None = None,
                  selfrag: SelfRagConfig | None = None) -> pa.Table:
    """Add ids (derived where the input has none), bookkeeping, prompts (and with ``tokens``
    their token ids), errors and empty output columns.

    With ``schema`` (the unified input schema) the input columns are conformed to it; prompts
    follow ``selfrag`` (the defaults when None).
    """
    selfrag = selfrag or SelfRagConfig()
    n = table.num_rows
    table, text_errors = repair_text(table)
    table = with_ids(table, shard, cfg.id_column)
    if schema is not None:
        table = conform(table, schema)
    tasks = [t if t is not None else cfg.default_task for t in optional_column(table, cfg.task_column)]
    prompts, errors = zip(*[(None, bad) if bad else row_prompt(q, i, t, selfrag) for q, i, t, bad in zip(
        table.column(cfg.question_column).to_pylist(), optional_column(table, cfg.input_column), tasks,
        text_errors)]) if n else ((), ())
    values = {name: [None] * n for name in OUTPUT_TYPES}
    values.update(prompt=prompts, error=errors, model=[model] * n, run_id=[run_id] * n,
                  **{SHARD: [shard] * n, OFFSET: range(n)})
    values[PROMPT_IDS] = [None if p is None or tokens is None else tokens.prompt(p) for p in prompts]
    return set_columns(table, values)


def prepare_contract(cfg: Config, schema: pa.Schema) -> Contract:
    """Prepare reads the input columns and writes every row's id, the output columns (as nulls,
    so every block has one schema) and the bookkeeping columns."""
    i = cfg.input
    id_type = schema.field(i.id_column).type if i.id_column in schema.names else pa.string()
    return Contract("prepare", reads={i.question_column: ANY},
                    writes={i.id_column: id_type, **OUTPUT_TYPES, **INTERNAL_TYPES})


def prepare_shards(batch: pa.Table, cfg: InputConfig, selfrag: SelfRagConfig, output: OutputFolder, model: str,
                   run_id: str, schema: pa.Schema, tokenizer: TokenizerSpec, annotation_hash: str) -> pa.Table:
    """Ray Data task: a batch of shard paths in, their prepared rows out (all in one schema),
    without the rows a previous run of the same annotation identity staged already in ``output``
    (whose storage reads the shards)."""
    with Reporter("prepare").batch(batch.num_rows):
        return pa.concat_tables([rows_to_annotate(shard, cfg, selfrag, output, model, run_id, schema, tokenizer,
                                                  annotation_hash) for shard in batch.column("shard").to_pylist()])


def rows_to_annotate(shard: str, cfg: InputConfig, selfrag: SelfRagConfig, output: OutputFolder, model: str,
                     run_id: str, schema: pa.Schema, tokenizer: TokenizerSpec, annotation_hash: str) -> pa.Table:
    """The prepared rows of ``shard`` (``prepare_table``), without those a previous run of the
    same annotation identity staged already in ``output`` (whose storage reads the shard)."""
    storage = output.storage
    tokens = spec_tokens(storage, tokenizer)[0]  # built once per process
    rows = prepare_table(storage.read_table(shard), shard, cfg, model, run_id, schema, tokens, selfrag)
    staged = staged_rows.staged_offsets(output, annotation_hash, shard)
    if len(staged):
        rows = rows.filter(pc.invert(pc.is_in(rows.column(OFFSET), pa.array(staged))))
    return rows
