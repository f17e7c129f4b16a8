"""Checks run before any model is loaded, and the run plan they produce.

Inputs readable and agreeing on columns, output location writable and not inside an input,
model tokenizer and retrieval index usable; shards already done (resume) or unreadable
(``on_bad_shard: skip``) are set aside. Each failure raises with one clear message naming the
path, column or key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import pyarrow as pa

from ..infra.config import Config
from ..output.identity import annotation_identity, identity_changes, identity_hash
from ..infra.io import InputError, Storage, inside, is_component, location, shard_stem
from ..output.folder import OutputFolder
from ..retrieval.encoder import resolve_dtype
from ..retrieval.index import (
    build_index_in_process,
    build_version,
    check_compatible,
    is_version,
    read_meta,
    resolve_index,
)
from ..output.schema import ALL_TYPES
from ..selfrag.tokens import MissingReflectionTokens
from ..model.tokenizer import tokenizer_spec
from .runner import in_process_refusal

log = logging.getLogger(__name__)


class PreflightError(ValueError):
    """The job cannot start; nothing has been loaded or written."""


@dataclass
class Plan:
    """What a run will do."""

    #: The output location the run writes, with the run's storage.
    output: OutputFolder
    #: Shards to annotate now, with their row counts.
    todo: dict[str, int]
    #: The unified schema of all readable shards.
    schema: pa.Schema
    #: What decides the annotations (``pipeline.output.identity``); markers record its hash.
    identity: dict
    #: Shards whose success marker exists (skipped unless overwrite): their marker contents.
    done: list[dict] = field(default_factory=list)
    #: Unreadable shards skipped under ``on_bad_shard: skip``: {shard, error}.
    bad: list[dict] = field(default_factory=list)
    #: Rows of each shard to do that an earlier run of the same identity staged (set once the
    #: run holds the output's lease).
    staged: dict[str, int] = field(default_factory=dict)
    #: Row count of every readable shard (to do or done).
    rows_in: dict[str, int] = field(default_factory=dict)
    #: Row ids over all readable shards: nulls given derived ids, duplicates (see ``scan_ids``).
    ids: dict = field(default_factory=dict)
    #: The version of every readable shard (``Storage.file_version``): markers and staged rows record
    #: it, so that a shard replaced under the same name is never taken for the one annotated.
    versions: dict[str, dict] = field(default_factory=dict)
    #: When the model stages started (epoch seconds; set by the run): the origin of the
    #: manifest's stage timeline.
    timeline_origin: float | None = None
    #: Where the stages ran (``runner``: ray or in_process); None when no shard needed model work.
    runner: str | None = None

    @property
    def storage(self) -> Storage:
        """The run's storage (the output's: it reads the inputs, the model and the index too)."""
        return self.output.storage

    @property
    def annotation_hash(self) -> str:
        """The hash of ``identity``: recorded in every marker, and the default run id."""
        return identity_hash(self.identity)


def check_inputs(cfg: Config, storage: Storage) -> tuple[dict[str, int], pa.Schema, list[dict]]:
    """Readable shards with their row counts, their unified schema, and the bad shards set aside.

    Checks each shard for the required column, for columns that would collide with the
    output's, and for column types that agree across shards.
    """
    shards = storage.list_shards(cfg.input.paths)
    stems = [shard_stem(s) for s in shards]
    unusable = [s for s, stem in zip(shards, stems) if not is_component(stem)]
    if unusable:
        raise InputError(f"input shard {unusable[0]} has a file name that gives no usable output name; rename it")
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise InputError(f"input shards share file names {dup}; their outputs would collide")
    rows, schemas, bad = {}, {}, []
    for shard in shards:
        try:
            schemas[shard], rows[shard] = storage.read_footer(shard)
        except InputError as exc:
            if cfg.output.on_bad_shard != "skip":
                raise InputError(f"{exc} (set output.on_bad_shard=skip to go on without it)") from None
            log.warning("skipping bad shard: %s", exc)
            bad.append({"shard": shard, "error": str(exc)})
            continue
        names = schemas[shard].names
        if cfg.input.question_column not in names:
            raise InputError(f"shard {shard} has no question column '{cfg.input.question_column}' "
                             f"(columns: {names}); set input.question_column")
        clash = sorted(set(names) & set(ALL_TYPES))
        if clash:
            raise InputError(f"shard {shard} has columns {clash} that the output adds; rename them")
    if not schemas:
        raise InputError("no readable input shard")
    schema = check_compatible_schemas(schemas)
    if any(cfg.input.id_column not in s.names for s in schemas.values()):
        # shards without ids get derived string ids, so the id column is text everywhere
        id_field = pa.field(cfg.input.id_column, pa.string())
        index = schema.get_field_index(cfg.input.id_column)
        schema = schema.set(index, id_field) if index >= 0 else schema.insert(0, id_field)
    return rows, schema, bad


def scan_ids(storage: Storage, shards: list[str], id_column: str, examples: int = 5) -> dict:
    """Row ids over all shards as the job will assign them (null or missing ids derived as
    ``"<shard stem>:<offset>"``): ``{"null_derived": null ids given derived ones, "duplicates": {"rows": rows whose id an
    earlier row already has, "ids": distinct such ids, "examples": the first few}}``. Reads only
    the id column and keeps a 64-bit hash per row."""
    import numpy as np
    import pandas as pd

    from ..stages.prepare import derived_id, repair_text

    def ids_of(shard: str) -> tuple[list[str], int]:
        try:
            column = storage.read_column(shard, id_column)
            values = repair_text(pa.table({id_column: column}))[0].column(0).to_pylist()
            nulls = values.count(None)
        except (KeyError, pa.ArrowInvalid):  # a shard without the id column: every id is derived
            values, nulls = [None] * storage.read_footer(shard)[1], 0
        return [derived_id(shard, i) if v is None else str(v) for i, v in enumerate(values)], nulls

    hashes, nulls = [], 0
    for shard in shards:
        ids, null = ids_of(shard)
        nulls += null
        hashes.append(pd.util.hash_array(np.array(ids, dtype=object)))
    all_hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    unique, counts = np.unique(all_hashes, return_counts=True)
    repeated = set(unique[counts > 1].tolist())
    found = []
    if repeated:  # rare: read the ids again for examples
        for shard, shard_hashes in zip(shards, hashes):
            ids, _ = ids_of(shard)
            for i, h in zip(ids, shard_hashes.tolist()):
                if h in repeated and i not in found:
                    found.append(i)
            if len(found) >= examples:
                break
    return {"null_derived": nulls, "duplicates": {"rows": int((counts - 1).sum()), "ids": len(repeated),
                                                  "examples": found[:examples]}}


def check_compatible_schemas(schemas: dict[str, pa.Schema]) -> pa.Schema:
    """The unified schema of all shards. Refuses shards whose same-named columns have types
    that cannot be unified (rows of all shards stream together, so a column has one type).
    A dictionary-encoded column (e.g. a pandas categorical) counts as its values' type: the
    encoding is how a shard stores the values, not what they are."""
    seen: dict[str, tuple[str, pa.DataType]] = {}
    for shard, schema in schemas.items():
        for fld in schema:
            if pa.types.is_dictionary(fld.type):
                fld = fld.with_type(fld.type.value_type)
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


def check_output(cfg: Config, output: OutputFolder, shards: list[str] = ()) -> None:
    """The output location neither is, contains, nor lies inside any input location, and no
    input shard (``shards``, as listed) really is a file inside it, and it can be written. All
    compared as canonical locations (``io.location``), so no spelling, ``..`` or symlink, to a
    directory or to a file, gets around it."""
    where = location(output.path)
    for given in cfg.input.paths:
        root = output.storage.input_location(given)
        if inside(where, root) or inside(root, where):
            relation = "is" if where == root else ("is inside" if inside(where, root) else "contains")
            raise PreflightError(f"output.path {cfg.output.path} {relation} the input location {given} "
                                 f"({root}); writing there could overwrite input shards: choose an output "
                                 "outside every input")
    for shard in shards:  # a file that is a link into the output (given alone, or inside an input directory)
        real = location(shard)
        if inside(real, where):
            raise PreflightError(f"input shard {shard} is {real}, inside output.path {cfg.output.path}; "
                                 "writing there could overwrite it: choose an output outside every input")
    try:
        output.check_writable()
    except Exception as exc:  # noqa: BLE001 - endpoint, credentials, bucket, permissions: one message
        raise PreflightError(f"cannot write to output location {cfg.output.path}: {type(exc).__name__}: {exc}") from None


def read_marker(output: OutputFolder, shard: str) -> dict | None:
    """A shard's success marker, or None when absent or unreadable (then the shard is redone)."""
    return output.read_json(output.marker(shard))


def read_markers(cfg: Config, output: OutputFolder, rows: dict[str, int]) -> dict[str, dict | None]:
    """Every readable shard's success marker (None: not done). With ``overwrite``: none."""
    if cfg.output.overwrite:
        return dict.fromkeys(rows)
    return {shard: read_marker(output, shard) for shard in rows}


def describe_change(old: dict, new: dict) -> str:
    """How a shard's version changed, e.g. ``size 1200 -> 1350``."""
    return ", ".join(f"{key} {old.get(key)} -> {new.get(key)}" for key in sorted(set(old) | set(new))
                     if old.get(key) != new.get(key))


def recorded_identity(output: OutputFolder, marker: dict) -> dict | None:
    """The annotation identity a shard's marker stands for: the one it records, else (a marker
    written before markers recorded it) the run manifest's when its hash is the marker's; None
    when neither tells."""
    old = marker.get("annotation_identity")
    if isinstance(old, dict):
        return old
    manifest = output.read_json(output.manifest_file)
    old = manifest.get("annotation_identity") if isinstance(manifest, dict) else None
    return old if isinstance(old, dict) and identity_hash(old) == marker.get("annotation_hash") else None


def split_done(cfg: Config, output: OutputFolder, rows: dict[str, int], markers: dict[str, dict | None],
               identity: dict, versions: dict[str, dict] | None = None) -> tuple[dict[str, int], list[dict]]:
    """(shards to annotate, markers of shards already done). Refuses to resume into an output
    whose shards were annotated with another annotation identity, naming what differs (the
    identity the marker records, ``recorded_identity``), or whose
    input shards were replaced since they were annotated (``versions``: each shard's current
    ``Storage.file_version``; markers written before versions were recorded are not checked)."""
    todo, done, current, changed = {}, [], identity_hash(identity), []
    for shard, n in rows.items():
        marker = markers[shard]
        if marker is None:
            todo[shard] = n
        elif marker.get("annotation_hash") != current:
            old = recorded_identity(output, marker)
            why = ("; ".join(identity_changes(old, identity)) if old is not None
                   else "written by an older version of the job, whose markers do not say what it annotated with")
            raise PreflightError(
                f"{cfg.output.path} holds shards annotated with another annotation identity "
                f"({marker.get('annotation_hash')}, this run: {current}): {why}. Use another output.path "
                "or output.overwrite=true (rescaling, batch sizes and storage settings never cause this)")
        else:
            done.append(marker)
            recorded, now = marker.get("input"), (versions or {}).get(shard)
            if isinstance(recorded, dict) and now is not None and recorded != now:
                changed.append(f"{shard} ({describe_change(recorded, now)}; marker "
                               f"{output.marker(shard)})")
    if changed:
        raise PreflightError(
            f"{len(changed)} input shard(s) changed since {cfg.output.path} annotated them: {'; '.join(changed[:5])}"
            f"{'; ...' if len(changed) > 5 else ''}. Their outputs annotate the old content. Delete a shard's "
            "marker to annotate it again, or use another output.path (or output.overwrite=true to redo every shard)")
    return todo, done


def check_model(cfg: Config, storage: Storage) -> None:
    """The model's tokenizer loads and knows the 15 reflection tokens (its spec, which the run
    uses, is cached on this machine after the first check)."""
    try:
        tokenizer_spec(storage, cfg.engine.model)
    except MissingReflectionTokens as exc:
        raise PreflightError(f"model {cfg.engine.model!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any loading failure becomes one message
        raise PreflightError(f"cannot load the model's tokenizer from {cfg.engine.model!r}: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def index_is_stale(cfg: Config, storage: Storage, version: str) -> str | None:
    """Why the index version ``version`` no longer matches ``retrieval.corpus`` (its SHA-256
    differs from the one ``meta.json`` records), or None. Only checked with ``build_if_missing``
    (small corpora built in the driver); indexes built by ``jobs.build_index`` are the user's to manage."""
    r = cfg.retrieval
    if not r.build_if_missing or not storage.exists(r.corpus):
        return None
    recorded = read_meta(storage, version).get("corpus_sha256")
    current = storage.sha256(r.corpus)
    if recorded in (None, current):
        return None
    return f"it was built from another version of {r.corpus} (SHA-256 {recorded[:12]}, now {current[:12]})"


def build_index(r, storage: Storage) -> str:
    """Build a new version of the index of ``r.corpus`` at the location ``r.index_dir`` in this
    process (local or s3://) and make it current; returns the version's directory. The version
    is written whole beside the others, then ``CURRENT`` switches to it: the versions other runs
    are reading are never touched."""
    try:
        version, _ = build_version(storage, r.index_dir, partial(build_index_in_process, r, storage))
    except FileNotFoundError as exc:
        raise PreflightError(f"cannot build the retrieval index: corpus not found: {r.corpus}") from exc
    except ValueError as exc:
        raise PreflightError(f"cannot build the retrieval index at {r.index_dir}: {exc}") from None
    return version


def ensure_index(cfg: Config, storage: Storage) -> str | None:
    """Resolve ``retrieval.index_dir`` once, to the exact index version this run searches: the
    location's current version, built from the corpus first when there is none or (if allowed)
    when the corpus changed since it was built; check that it matches the encoder. Sets
    ``cfg.retrieval.index_dir`` to that version, so that the annotation identity, the retrieval
    service (and every restart of its replicas) and ``_config.yaml`` all name it, whatever other
    runs build at the location meanwhile. Resolves ``retrieval.dtype`` too (null/auto: by this
    machine's CPU), so that every replica computes in the dtype the identity names. Returns the
    version (None in never mode)."""
    if cfg.selfrag.mode == "never":
        return None
    r = cfg.retrieval
    r.dtype = resolve_dtype(r.dtype, r.device)  # every replica computes in the dtype the identity names
    try:
        version = resolve_index(storage, r.index_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise PreflightError(f"unusable retrieval index at {r.index_dir}: {exc}") from None
    if version is None:
        if not r.build_if_missing:
            raise PreflightError(f"no retrieval index at {r.index_dir}; build it or set retrieval.build_if_missing=true")
        print(f"building retrieval index from {r.corpus} -> {r.index_dir} (first run)", flush=True)
        version = build_index(r, storage)
    elif (stale := index_is_stale(cfg, storage, version)) is not None:
        if version == r.index_dir and is_version(storage, version):
            location = version.rstrip("/").rsplit("/", 1)[0]
            raise PreflightError(
                f"retrieval.index_dir names the index version {version}, but {stale}. A version is never rebuilt: "
                f"set retrieval.index_dir to its location {location} to build a new version there, or "
                "retrieval.build_if_missing=false to search this version as it is")
        print(f"building a new version of the retrieval index at {r.index_dir}: {stale} "
              f"(runs reading {version} keep reading it)", flush=True)
        version = build_index(r, storage)
    try:
        check_compatible(read_meta(storage, version), r)
    except ValueError as exc:
        raise PreflightError(str(exc)) from None
    if version != r.index_dir:
        log.info("retrieval index %s: this run searches its version %s", r.index_dir, version)
    r.index_dir = version
    return version


def preflight(cfg: Config) -> Plan:
    """All checks, in order; returns the run plan, whose output (``OutputFolder.of(cfg)``) the
    run reads and writes everything with. Loads no model (only the tokenizer)."""
    refusal = in_process_refusal(cfg) if cfg.runner == "in_process" else None
    if refusal:
        raise PreflightError(f"runner=in_process cannot run this job: {refusal}; use runner=ray (or auto)")
    output = OutputFolder.of(cfg)
    storage = output.storage
    rows, schema, bad = check_inputs(cfg, storage)
    check_output(cfg, output, [*rows, *(b["shard"] for b in bad)])
    ids = scan_ids(storage, list(rows), cfg.input.id_column)
    if ids["null_derived"]:  # derived ids are text: the id column must be a string column
        index = schema.get_field_index(cfg.input.id_column)
        schema = schema.set(index, pa.field(cfg.input.id_column, pa.string()))
    markers = read_markers(cfg, output, rows)
    if any(m is None for m in markers.values()):
        check_model(cfg, storage)
    ensure_index(cfg, storage)  # before the identity, which names the index version it resolves
    identity = annotation_identity(cfg, storage)
    versions = {shard: storage.file_version(shard) for shard in rows}
    todo, done = split_done(cfg, output, rows, markers, identity, versions)
    return Plan(output=output, todo=todo, schema=schema, identity=identity, done=done, bad=bad, rows_in=rows, ids=ids,
                versions=versions)
