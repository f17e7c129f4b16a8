"""Checks run before any model is loaded: inputs readable, columns present, model and index usable.

Each failure raises with one clear message naming the path, column or key.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from .config import Config
from .io import InputError, list_shards, read_schema, shard_stem
from .retrieval.index import build_flat_index, check_compatible, index_exists, read_meta
from .selfrag.tokens import ReflectionIds
from .stages.columns import ALL_TYPES

log = logging.getLogger(__name__)


class PreflightError(ValueError):
    """The job cannot start; nothing has been loaded or written."""


def check_inputs(cfg: Config) -> tuple[list[str], pa.Schema]:
    """The input shards and their unified schema, after checking each one's schema for the
    required column, for columns that would collide with the output's, and for agreement."""
    shards = list_shards(cfg.input.paths)
    stems = [shard_stem(s) for s in shards]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise InputError(f"input shards share file names {dup}; their outputs would collide")
    schemas = {}
    for shard in shards:
        schemas[shard] = read_schema(shard)
        names = schemas[shard].names
        if cfg.input.question_column not in names:
            raise InputError(f"shard {shard} has no question column '{cfg.input.question_column}' "
                             f"(columns: {names}); set input.question_column")
        clash = sorted(set(names) & set(ALL_TYPES))
        if clash:
            raise InputError(f"shard {shard} has columns {clash} that the output adds; rename them")
    schema = check_compatible_schemas(schemas)
    if any(cfg.input.id_column not in s.names for s in schemas.values()):
        # shards without ids get derived string ids, so the id column is text everywhere
        schema = schema.set(schema.get_field_index(cfg.input.id_column), pa.field(cfg.input.id_column, pa.string())) \
            if cfg.input.id_column in schema.names else schema.insert(0, pa.field(cfg.input.id_column, pa.string()))
    return shards, schema


def check_compatible_schemas(schemas: dict[str, pa.Schema]) -> pa.Schema:
    """The unified schema of all shards. Refuses shards whose same-named columns have types
    that cannot be unified (rows of all shards stream together, so a column has one type)."""
    seen: dict[str, tuple[str, pa.DataType]] = {}
    for shard, schema in schemas.items():
        for fld in schema:
            if fld.name not in seen:
                seen[fld.name] = (shard, fld.type)
                continue
            first_shard, first_type = seen[fld.name]
            try:
                merged = pa.unify_schemas([pa.schema([pa.field(fld.name, first_type)]), pa.schema([fld])],
                                          promote_options="permissive")
                seen[fld.name] = (first_shard, merged.field(fld.name).type)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                raise InputError(f"column '{fld.name}' is {first_type} in {first_shard} but {fld.type} "
                                 f"in {shard}; all shards must agree on column types") from None
    return pa.schema([pa.field(name, typ) for name, (_, typ) in seen.items()])


def check_model(cfg: Config) -> None:
    """The model's tokenizer loads and knows the 15 reflection tokens."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.engine.model)
    except Exception as exc:  # noqa: BLE001 - any loading failure becomes one message
        raise PreflightError(f"cannot load the model's tokenizer from {cfg.engine.model!r}: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    try:
        ReflectionIds.from_lookup(tok.convert_tokens_to_ids, tok.unk_token_id)
    except ValueError as exc:
        raise PreflightError(f"model {cfg.engine.model!r}: {exc}") from None


def ensure_index(cfg: Config) -> None:
    """The retrieval index exists (built from the corpus on first run if allowed) and matches the encoder."""
    if cfg.selfrag.mode == "never":
        return
    r = cfg.retrieval
    if not index_exists(r.index_dir):
        if not r.build_if_missing:
            raise PreflightError(f"no retrieval index at {r.index_dir}; build it or set retrieval.build_if_missing=true")
        log.info("building the retrieval index from %s into %s (first run)", r.corpus, r.index_dir)
        print(f"building retrieval index from {r.corpus} -> {r.index_dir} (first run)", flush=True)
        try:
            build_flat_index(r)
        except FileNotFoundError as exc:
            raise PreflightError(f"cannot build the retrieval index: corpus not found: {r.corpus}") from exc
    try:
        check_compatible(read_meta(r.index_dir), r)
    except ValueError as exc:
        raise PreflightError(str(exc)) from None


def preflight(cfg: Config) -> tuple[list[str], pa.Schema]:
    """All checks, in order; returns the input shards and their unified schema."""
    shards, schema = check_inputs(cfg)
    check_model(cfg)
    ensure_index(cfg)
    return shards, schema
