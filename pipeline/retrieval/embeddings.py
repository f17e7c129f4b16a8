"""Precomputed passage vectors for ``jobs.build_index`` (``retrieval.embeddings``): the index is
built from them and the corpus, with no encoder run over the corpus.

Formats (``retrieval.embeddings_format``):

- ``contriever_pickle``: each file a pickle of ``(ids, embeddings)``, as Contriever's
  ``generate_passage_embeddings.py`` writes them (the Self-RAG authors'
  ``wikipedia_embeddings/passages_00`` ...): ids a list of str or int passage ids, embeddings a
  2-D float numpy array (float16, float32 or float64; added as float32). A pickle can run any
  code while it is read, so these files are read only by ``RestrictedUnpickler``, which admits
  the few numpy callables an array, its dtype and its ids need and refuses everything else
  before anything in the file runs. A whole file is in memory while it is added.
- ``npy``: each file a 2-D float array saved by ``numpy.save`` (``.npy``; an object array is
  refused, nothing is unpickled), read in chunks. The files hold no ids: row i of the files
  concatenated in their order is passage i of the corpus (only the counts can be checked).
- ``parquet``: columns ``id`` and ``embedding`` (list, large_list or fixed_size_list of
  floats), read in chunks.

``retrieval.embeddings`` is a glob, a file or a directory (its files, those starting with ``.``
or ``_`` left out), local or s3://. The files are taken in natural name order (``passages_2``
before ``passages_10``), and the vectors of all of them in that order must be the corpus's
passages in corpus order: the ids (where the files have them) and the count are checked
against ``retrieval.corpus``, the dimension against ``retrieval.encoder``'s hidden size, read
from its config without loading the model. The encoder must be the one that produced the
vectors: it still encodes the queries at search time.
"""

from __future__ import annotations

import codecs
import logging
import pickle
import posixpath
import re
import time
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..infra.config import EMBEDDINGS_FORMATS, RetrievalConfig
from ..infra.io import GLOB_CHARS, InputError, Storage, join
from .corpus import iter_corpus
from .encoder import resolve_encoder_path
from .index import IndexBuilder, corpus_fingerprint

log = logging.getLogger(__name__)


class UnsafePickleError(ValueError):
    """A pickle that references something a passage-embeddings file does not need."""


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What pickle protocols 0-2 spell bytes as (``_codecs.encode(str, "latin1")``), and no more."""
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError(f"_codecs.encode is admitted only as (str, 'latin1'), got {type(text).__name__}, "
                                f"{encoding!r}")
    return codecs.encode(text, "latin1")


def _admitted() -> dict[tuple[str, str], object]:
    """Every (module, name) a pickle of numpy arrays and lists of str/int may reference, mapped to
    the installed numpy's object; both the numpy 1.x (``numpy.core``) and 2.x (``numpy._core``)
    spellings, so a file written under either loads under either. The objects are taken from
    numpy's own reductions, never imported by the names the file gives."""
    reconstruct = np.zeros(1).__reduce__()[0]  # ndarray, protocols 0-4
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # ndarray, protocol 5
    scalar = np.float32(0).__reduce__()[0]  # numpy scalars (e.g. np.int64 ids)
    admitted: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_bytes}
    for core in ("numpy.core", "numpy._core"):
        admitted[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        admitted[(f"{core}.multiarray", "scalar")] = scalar
        admitted[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return admitted


ADMITTED = _admitted()


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for data only: numpy arrays, their dtypes, numpy scalars, and the builtin
    containers and literals (list, tuple, dict, str, bytes, int, float) pickle builds without
    looking anything up. Every other reference (``os.system``, ``subprocess.Popen``,
    ``builtins.eval``, torch tensors, any class) raises ``UnsafePickleError`` when the pickle
    names it, that is before it could be called; persistent ids are refused too."""

    def __init__(self, file, source: str = "pickle"):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        found = ADMITTED.get((module, name))
        if found is None:
            raise UnsafePickleError(
                f"{self.source}: refused: the pickle references {module}.{name}, which a passage-embeddings "
                "file does not need (only numpy arrays, dtypes and lists of str or int ids are read; nothing "
                "in the file was run)")
        return found

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: refused: the pickle uses a persistent id, which a "
                                "passage-embeddings file does not need")


def restricted_load(file, source: str = "pickle"):
    """Unpickle ``file`` (a binary file object) with ``RestrictedUnpickler``; ValueError naming
    ``source`` for anything unreadable, UnsafePickleError for anything refused."""
    try:
        return RestrictedUnpickler(file, source).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt, not a pickle: one clear line
        raise ValueError(f"{source}: not a readable pickle: {type(exc).__name__}: {exc}") from None


def natural_key(path: str) -> list:
    """Sort key comparing runs of digits as numbers: passages_2 before passages_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def list_embedding_files(storage: Storage, given: str, fmt: str) -> list[str]:
    """The files ``retrieval.embeddings`` names (a glob, a file, or a directory's files), in
    natural order; ValueError naming the key when there are none, or when an npy or parquet
    listing holds a file of another kind."""
    fs, path = storage.filesystem(given)
    pattern = given
    if not any(ch in path for ch in GLOB_CHARS):
        try:
            is_dir = fs.isdir(path)
        except Exception as exc:  # noqa: BLE001 - permissions, endpoint: one clear line
            raise ValueError(f"retrieval.embeddings: cannot list {given}: {type(exc).__name__}: {exc}") from None
        if is_dir:
            pattern = join(given, "*")
    try:
        files = storage.list_shards([pattern])
    except InputError as exc:
        reason = "matches no files" if "no Parquet shards" in str(exc) else str(exc)
        raise ValueError(f"retrieval.embeddings={given}: {reason}") from None
    suffix = {"npy": ".npy", "parquet": ".parquet"}.get(fmt)
    if suffix:
        other = [f for f in files if not f.lower().endswith(suffix)]
        if other:
            raise ValueError(f"retrieval.embeddings={given} (format {fmt}) lists {other[0]}, which is not a "
                             f"{suffix} file (narrow the glob, e.g. {posixpath.join(given.rstrip('/'), '*' + suffix)})")
    return sorted(files, key=natural_key)


def encoder_dim(cfg: RetrievalConfig) -> int:
    """The encoder's hidden size (the dimension of its vectors) from its config, without loading
    its weights."""
    from transformers import AutoConfig

    path = resolve_encoder_path(cfg.encoder)  # ValueError naming the package when it is missing
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - unknown id, no network, no config.json
        raise ValueError(f"retrieval.encoder={cfg.encoder}: cannot read its config: {type(exc).__name__}: {exc}") \
            from None
    dim = getattr(config, "hidden_size", None)
    if not isinstance(dim, int):
        raise ValueError(f"retrieval.encoder={cfg.encoder}: its config names no hidden_size")
    return dim


def _float_vectors(array, source: str) -> np.ndarray:
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.dtype.kind != "f":
        what = f"{array.dtype} array of shape {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"{source}: the embeddings must be a 2-D float numpy array (n, dim), got {what}")
    return array


def _id_list(ids, source: str) -> list[str]:
    """Passage ids as strings (ints as their decimal digits, like the corpus's ids)."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or ids.dtype.kind not in "iuUSO":
            raise ValueError(f"{source}: the ids must be a list of str or int, got a {ids.dtype} array of shape "
                             f"{ids.shape}")
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"{source}: the ids must be a list of str or int, got {type(ids).__name__}")
    out = []
    for i, value in enumerate(ids):
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, bool) or not isinstance(value, (str, int, np.integer)):
            raise ValueError(f"{source}: id {i} is a {type(value).__name__}, not a str or int")
        out.append(str(value))
    return out


def read_contriever_pickle(storage: Storage, path: str, chunk: int) -> Iterator[tuple[list[str] | None, np.ndarray]]:
    """A Contriever pickle ``(ids, embeddings)``, through the restricted unpickler, in chunks."""
    fs, p = storage.filesystem(path)
    with fs.open(p, "rb") as f:
        loaded = restricted_load(f, path)
    if not isinstance(loaded, (tuple, list)) or len(loaded) != 2:
        raise ValueError(f"{path}: expected a pickled (ids, embeddings) pair, got {type(loaded).__name__}")
    ids, vectors = _id_list(loaded[0], path), _float_vectors(loaded[1], path)
    if len(ids) != len(vectors):
        raise ValueError(f"{path}: {len(ids)} ids for {len(vectors)} vectors")
    for start in range(0, len(ids), chunk):
        yield ids[start:start + chunk], vectors[start:start + chunk]


def read_npy(storage: Storage, path: str, chunk: int) -> Iterator[tuple[list[str] | None, np.ndarray]]:
    """A ``.npy`` float array (n, dim), read ``chunk`` rows at a time (no ids)."""
    fmt = np.lib.format
    fs, p = storage.filesystem(path)
    with fs.open(p, "rb") as f:
        try:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
            else:
                raise ValueError(f"format version {version} (expected 1.0 or 2.0)")
        except ValueError as exc:
            raise ValueError(f"{path}: not a readable .npy file: {exc}") from None
        if dtype.hasobject or dtype.kind != "f" or len(shape) != 2:
            raise ValueError(f"{path}: the embeddings must be a 2-D float array (n, dim), got {dtype} "
                             f"of shape {shape}")
        if fortran:
            raise ValueError(f"{path}: a Fortran-ordered array; save it with "
                             "numpy.save(path, numpy.ascontiguousarray(a))")
        rows, dim = shape
        row_bytes = dim * dtype.itemsize
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            data = f.read(n * row_bytes)
            if len(data) != n * row_bytes:
                raise ValueError(f"{path}: truncated: its header promises {rows} rows, it ends within row "
                                 f"{start + len(data) // max(1, row_bytes)}")
            yield None, np.frombuffer(data, dtype=dtype).reshape(n, dim)


def read_parquet(storage: Storage, path: str, chunk: int) -> Iterator[tuple[list[str] | None, np.ndarray]]:
    """Parquet with columns ``id`` and ``embedding`` (a list of floats), in chunks."""
    fs, p = storage.filesystem(path)
    with fs.open(p, "rb") as f:
        try:
            parquet = pq.ParquetFile(f)
        except Exception as exc:  # noqa: BLE001 - not Parquet: one clear line
            raise ValueError(f"{path}: not a readable Parquet file: {type(exc).__name__}: {exc}") from None
        schema = parquet.schema_arrow
        missing = [c for c in ("id", "embedding") if c not in schema.names]
        if missing:
            raise ValueError(f"{path}: lacks columns {missing} (has {schema.names})")
        kind = schema.field("embedding").type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) \
                or not pa.types.is_floating(kind.value_type):
            raise ValueError(f"{path}: column embedding must be a list of floats, is {kind}")
        for batch in parquet.iter_batches(batch_size=chunk, columns=["id", "embedding"]):
            column = batch.column("embedding")
            if column.null_count:
                raise ValueError(f"{path}: column embedding has null rows")
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
            dim = int(lengths[0]) if len(lengths) else 0
            if len(lengths) and (lengths != dim).any():
                raise ValueError(f"{path}: the embeddings have different lengths ({sorted(set(lengths.tolist()))[:5]})")
            values = column.flatten()
            if values.null_count:
                raise ValueError(f"{path}: column embedding has null values")
            vectors = values.to_numpy(zero_copy_only=False).reshape(len(column), dim)
            if batch.column("id").null_count:
                raise ValueError(f"{path}: column id has nulls")
            yield pc.cast(batch.column("id"), pa.string()).to_pylist(), vectors


READERS = {"contriever_pickle": read_contriever_pickle, "npy": read_npy, "parquet": read_parquet}
assert set(READERS) == set(EMBEDDINGS_FORMATS)


class _CorpusCursor:
    """The corpus, taken n passages at a time in corpus order."""

    def __init__(self, storage: Storage, path: str):
        self.batches = iter_corpus(storage, path)
        self.pending: list[pa.Table] = []
        self.buffered = 0

    def take(self, n: int) -> pa.Table:
        """The next ``n`` passages (fewer at the corpus's end)."""
        while self.buffered < n:
            batch = next(self.batches, None)
            if batch is None:
                break
            self.pending.append(batch)
            self.buffered += batch.num_rows
        table = pa.concat_tables(self.pending) if self.pending else None
        if table is None:
            return pa.table({"id": pa.array([], pa.string()), "title": pa.array([], pa.string()),
                             "text": pa.array([], pa.string())})
        head, rest = table.slice(0, n), table.slice(n)
        self.pending, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows
        return head


class EmbeddingsImport:
    """An index build from ``retrieval.embeddings`` and ``retrieval.corpus`` (both read with
    ``storage``). Constructing it lists the files and reads the encoder's dimension (refusing a
    bad listing before any version directory exists); ``build(out_dir, extra_meta)`` fits
    ``build_version``."""

    def __init__(self, cfg: RetrievalConfig, storage: Storage):
        if cfg.embeddings_format not in READERS:
            raise ValueError(f"retrieval.embeddings_format: {cfg.embeddings_format!r} is not one of "
                             f"{list(EMBEDDINGS_FORMATS)}")
        self.cfg, self.storage = cfg, storage
        self.files = list_embedding_files(storage, cfg.embeddings, cfg.embeddings_format)
        self.dim = encoder_dim(cfg)

    def build(self, out_dir: str, extra_meta: dict | None = None) -> dict:
        """Add every file's vectors, with the corpus passages they belong to, to an IndexBuilder
        into ``out_dir`` (trained on the first ``train_size`` vectors, added in chunks of
        ``add_chunk_size``); ValueError at the first id, count or dimension that does not fit."""
        cfg, start = self.cfg, time.time()
        read = READERS[cfg.embeddings_format]
        corpus = _CorpusCursor(self.storage, cfg.corpus)
        builder = IndexBuilder(cfg, self.dim, out_dir)
        checked_norms = False
        for path in self.files:
            row = 0
            for ids, vectors in read(self.storage, path, cfg.add_chunk_size):
                if vectors.shape[1] != self.dim:
                    raise ValueError(f"{path}: vectors of dimension {vectors.shape[1]}, but retrieval.encoder="
                                     f"{cfg.encoder} gives {self.dim}: name the encoder that produced them")
                vectors = np.ascontiguousarray(vectors, dtype=np.float32)
                bad = ~np.isfinite(vectors).all(axis=1)
                if bad.any():
                    raise ValueError(f"{path}: row {row + int(np.argmax(bad))} holds a NaN or infinite value")
                passages = corpus.take(len(vectors))
                if passages.num_rows < len(vectors):
                    raise ValueError(f"{path}: the embeddings hold more vectors than the corpus {cfg.corpus} has "
                                     f"passages ({builder.count + passages.num_rows}); the first extra one is row "
                                     f"{row + passages.num_rows} of this file")
                if ids is not None:
                    corpus_ids = passages.column("id").to_pylist()
                    if ids != corpus_ids:
                        j = next(i for i, (a, b) in enumerate(zip(ids, corpus_ids)) if a != b)
                        raise ValueError(f"{path}: row {row + j} has id {ids[j]!r}, but passage {builder.count + j} "
                                         f"of the corpus {cfg.corpus} is {corpus_ids[j]!r} (the vectors must be the "
                                         "corpus's passages in corpus order, files in natural name order)")
                if not checked_norms:
                    self._check_norms(path, vectors)
                    checked_norms = True
                builder.add(passages, vectors)
                row += len(vectors)
            rate = builder.count / max(time.time() - start, 1e-9)
            print(f"imported {path}: {row} vectors ({builder.count} in all, {rate:.0f}/s)", flush=True)
        rest = corpus.take(1)
        if rest.num_rows:
            raise ValueError(f"the embeddings hold {builder.count} vectors, but the corpus {cfg.corpus} has more "
                             f"passages (passage {builder.count} is {rest.column('id')[0].as_py()!r})")
        if builder.count == 0:
            raise ValueError(f"retrieval.embeddings={cfg.embeddings} and the corpus {cfg.corpus} hold no passages")
        imported = {"format": cfg.embeddings_format, "files": self.files, "vectors": builder.count}
        return builder.close({**corpus_fingerprint(self.storage, cfg.corpus), "imported": imported,
                              **(extra_meta or {}), "seconds": round(time.time() - start, 2)})

    def _check_norms(self, path: str, vectors: np.ndarray) -> None:
        """Warn when the vectors' norms contradict ``retrieval.normalize`` (queries would be
        normalised and passages not, or the reverse: the ranking would not be the encoder's)."""
        norms = np.linalg.norm(vectors, axis=1)
        unit = bool(len(norms)) and bool(np.allclose(norms, 1.0, atol=1e-2))
        if self.cfg.normalize and not unit:
            log.warning("%s: the vectors are not unit length, but retrieval.normalize=true normalises the queries "
                        "(Contriever's vectors are not normalised: set retrieval.normalize=false)", path)
