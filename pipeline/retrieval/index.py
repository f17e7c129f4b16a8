"""FAISS index and passage store on disk: build once, then load memory-mapped.

An index version is a directory holding ``index.faiss`` (inner-product FAISS index; row i is
passage i), ``passages.arrow`` (Arrow IPC file with id, title, text, memory-mapped so replicas
on a node share the pages) and ``meta.json`` (encoder, pooling, normalisation, dimension,
metric, passage count, corpus fingerprint, version name).

``retrieval.index_dir`` names an index *location*: a directory of immutable versions
(``v-<UTC time>-<random>/``) and a ``CURRENT`` file naming the current one. A build writes a
whole new version, then switches ``CURRENT`` by write-then-rename (``build_version``); nothing
ever writes into a version again or deletes one, so a run that resolved a version keeps
reading exactly it while other runs build new ones beside it. A directory holding the three
files directly (the layout before versions, or one version named on its own) is read as one
version; a new build into such a directory adds a version and ``CURRENT`` beside its files,
which stay as they are for the runs still reading them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from .. import io
from ..config import RetrievalConfig
from .corpus import read_corpus
from .encoder import Encoder

log = logging.getLogger(__name__)

INDEX_FILE, PASSAGES_FILE, META_FILE = "index.faiss", "passages.arrow", "meta.json"
INDEX_FILES = (INDEX_FILE, PASSAGES_FILE, META_FILE)
#: The pointer of an index location: the name of its current version (one line).
CURRENT_FILE = "CURRENT"
VERSION_PREFIX = "v-"
PASSAGE_SCHEMA = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])


def passage_texts(table: pa.Table) -> list[str]:
    """What is embedded for each passage: ``title + " " + text``, as the paper's retriever does."""
    titles = table.column("title").to_pylist()
    texts = table.column("text").to_pylist()
    return [f"{ti or ''} {tx or ''}".strip() for ti, tx in zip(titles, texts)]


def index_exists(index_dir: str) -> bool:
    """Whether ``index_dir`` itself holds a complete index (one version; local or s3://)."""
    return all(io.exists(io.join(index_dir, f)) for f in INDEX_FILES)


def current_version(location: str) -> str | None:
    """The version name the ``CURRENT`` pointer of an index location holds, or None without one."""
    pointer = io.join(location, CURRENT_FILE)
    if not io.exists(pointer):
        return None
    name = io.read_text(pointer).strip()
    if not name.startswith(VERSION_PREFIX) or any(ch in name for ch in "/\\\0"):
        raise ValueError(f"{pointer} does not name an index version ({name!r})")
    return name


def resolve_index(index_dir: str) -> str | None:
    """The exact index version ``index_dir`` names now: the version its ``CURRENT`` points to, or
    ``index_dir`` itself when it holds an index directly (the old layout, or one version named on
    its own); None when it holds none. Resolve once per run (preflight), then read only the
    version returned: ``CURRENT`` may point elsewhere a moment later."""
    name = current_version(index_dir)
    if name is not None:
        version = io.child(index_dir, name)
        if not index_exists(version):
            raise FileNotFoundError(f"{io.join(index_dir, CURRENT_FILE)} names {name}, which is not a complete "
                                    f"index (missing one of {', '.join(INDEX_FILES)})")
        return version
    return index_dir if index_exists(index_dir) else None


def is_version(index_dir: str) -> bool:
    """Whether ``index_dir`` is one version of an index location (built by ``build_version``:
    its ``meta.json`` records its own name). Versions are never built into or rebuilt."""
    if not io.exists(io.join(index_dir, META_FILE)):
        return False
    return read_meta(index_dir).get("version") == index_dir.rstrip("/").rsplit("/", 1)[-1]


def check_buildable(location: str) -> None:
    """Refuse (ValueError) to build into one version of an index: only a location gets new versions."""
    if is_version(location):
        parent = location.rstrip("/").rsplit("/", 1)[0]
        raise ValueError(f"{location} is one version of the index at {parent}, and a version is never rebuilt "
                         f"(a run may be reading it): build into the location {parent} instead")


def new_version_name() -> str:
    """A fresh version name: ``v-<UTC time>-<random>`` (sorts by build time, never reused)."""
    return f"{VERSION_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def build_version(location: str, build: Callable[[str, dict], dict]) -> tuple[str, dict]:
    """Build a new version of the index at ``location`` and make it the current one; returns
    (the version's directory, its metadata).

    ``build(local_dir, extra_meta)`` writes the index files into the new, empty local directory
    (recording ``extra_meta`` in ``meta.json``) and returns the metadata. The version is written
    whole under a new name (locally into a hidden directory renamed into place; for s3:// into a
    local temporary directory, then uploaded), and only then does ``CURRENT`` switch to it by
    write-then-rename. No version is modified or deleted: a run reading an earlier one keeps it."""
    check_buildable(location)
    name = new_version_name()
    version = io.child(location, name)
    if io.is_remote(location):
        with tempfile.TemporaryDirectory(prefix="selfrag-index-") as local:
            meta = build(local, {"version": name})
            io.upload_dir(local, version)
    else:
        staging = Path(location) / f".{name}.building"
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            meta = build(str(staging), {"version": name})
            os.rename(staging, version)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    io.write_text(io.join(location, CURRENT_FILE), name + "\n")
    log.info("index version %s is now current at %s", name, location)
    return version, meta


class IndexBuilder:
    """Builds an index directory from chunks of (passages, vectors) given in corpus order.

    Row i of the passage store is vector i of the index. A trainable index buffers the first
    ``train_size`` vectors, trains on them, then adds chunk by chunk, so memory is bounded by
    the training sample and the chunk size, never by the corpus.
    """

    def __init__(self, cfg: RetrievalConfig, dim: int, out_dir: str):
        import faiss

        self.cfg, self.dim, self.out = cfg, dim, Path(out_dir)
        present = [f for f in (*INDEX_FILES, CURRENT_FILE) if (self.out / f).exists()]
        if present:  # rewriting a memory-mapped file under a reader kills it (SIGBUS) or feeds it other rows
            raise ValueError(f"{out_dir} already holds an index ({', '.join(present)}); a build never writes over "
                             "one, since a run may be reading it: build a new version (build_version)")
        self.out.mkdir(parents=True, exist_ok=True)
        self.index = faiss.index_factory(dim, cfg.factory, faiss.METRIC_INNER_PRODUCT)
        self.store = ipc.new_file(self.out / PASSAGES_FILE, PASSAGE_SCHEMA)
        self.pending: list[np.ndarray] = []
        self.count = 0

    def add(self, passages: pa.Table, vectors: np.ndarray) -> None:
        """Append passages (id, title, text) and their vectors (n x dim, float32)."""
        if vectors.shape != (passages.num_rows, self.dim):
            raise ValueError(f"got {vectors.shape} vectors for {passages.num_rows} passages of dimension {self.dim}")
        self.store.write_table(passages.select(list(PASSAGE_SCHEMA.names)).cast(PASSAGE_SCHEMA))
        self.count += passages.num_rows
        if self.index.is_trained:
            self._add(vectors)
            return
        self.pending.append(np.ascontiguousarray(vectors, dtype=np.float32))
        if sum(len(v) for v in self.pending) >= self.cfg.train_size:
            self._train_and_flush()

    def _add(self, vectors: np.ndarray) -> None:
        for start in range(0, len(vectors), self.cfg.add_chunk_size):
            self.index.add(np.ascontiguousarray(vectors[start:start + self.cfg.add_chunk_size], dtype=np.float32))

    def _train_and_flush(self) -> None:
        sample = np.concatenate(self.pending)
        log.info("training %s on %d vectors", self.cfg.factory, len(sample))
        try:
            self.index.train(sample[: self.cfg.train_size])
        except RuntimeError as exc:
            raise ValueError(f"cannot train index {self.cfg.factory!r} on {min(len(sample), self.cfg.train_size)} "
                             f"vectors (raise retrieval.train_size or use a smaller factory): "
                             f"{str(exc).splitlines()[-1]}") from None
        self.pending = []
        self._add(sample)

    def close(self, extra_meta: dict | None = None) -> dict:
        """Train if still needed, write the index and the metadata; returns the metadata."""
        import faiss

        if not self.index.is_trained:
            self._train_and_flush()
        self.store.close()
        faiss.write_index(self.index, str(self.out / INDEX_FILE))
        meta = {
            "encoder": self.cfg.encoder, "pooling": self.cfg.pooling, "normalize": self.cfg.normalize,
            "dim": self.dim, "metric": "inner_product", "factory": self.cfg.factory,
            "passages": self.count, **(extra_meta or {}),
        }
        if self.index.ntotal != self.count:
            raise RuntimeError(f"index holds {self.index.ntotal} vectors for {self.count} passages")
        (self.out / META_FILE).write_text(json.dumps(meta, indent=2))
        return meta


def corpus_fingerprint(path: str) -> dict:
    """Where the corpus came from and the SHA-256 of its bytes."""
    return {"corpus": path, "corpus_sha256": io.sha256(path)}


def build_index_in_process(cfg: RetrievalConfig, out_dir: str, extra_meta: dict | None = None) -> dict:
    """Embed ``cfg.corpus`` in this process and build the index into the local ``out_dir``, which
    holds no index yet (small corpora: the embedded default; large ones use ``jobs.build_index``).
    A new version of an index location: ``build_version(location, partial(build_index_in_process, cfg))``."""
    start = time.time()
    corpus = read_corpus(cfg.corpus)
    encoder = Encoder(cfg)
    builder = IndexBuilder(cfg, encoder.dim, out_dir)
    for chunk in corpus.to_batches(max_chunksize=cfg.add_chunk_size):
        chunk = pa.Table.from_batches([chunk])
        builder.add(chunk, encoder.encode(passage_texts(chunk)))
    meta = builder.close({**corpus_fingerprint(cfg.corpus), **(extra_meta or {})})
    log.info("built index of %d passages in %.1fs at %s", corpus.num_rows, time.time() - start, out_dir)
    return meta


def set_search_params(index, nprobe: int, ef_search: int, k_factor: float = 1.0) -> None:
    """Apply nprobe / efSearch / the refine k_factor where the index has them (IVF / HNSW /
    IndexRefine); ignore them elsewhere."""
    import faiss

    space = faiss.ParameterSpace()
    # ParameterSpace names the IndexRefine factor "k_factor_rf" ("k_factor" is IVFPQR's)
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search), ("k_factor_rf", k_factor)):
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError:
            pass


def read_meta(index_dir: str) -> dict:
    """The index's metadata; FileNotFoundError naming the path when there is no index."""
    path = io.join(index_dir, META_FILE)
    if not io.exists(path):
        raise FileNotFoundError(f"no retrieval index at {index_dir} (missing {META_FILE})")
    return json.loads(io.read_text(path))


def check_compatible(meta: dict, cfg: RetrievalConfig, dim: int | None = None) -> None:
    """Refuse an index built with another encoder, pooling, normalisation or dimension."""
    built = (meta.get("encoder"), meta.get("pooling"), meta.get("normalize"))
    wanted = (cfg.encoder, cfg.pooling, cfg.normalize)
    if built != wanted:
        raise ValueError(f"index at {cfg.index_dir} was built with encoder/pooling/normalize {built}, "
                         f"but the config queries it with {wanted}")
    if dim is not None and meta.get("dim") != dim:
        raise ValueError(f"index at {cfg.index_dir} has dimension {meta.get('dim')}, the encoder gives {dim}")


class PassageStore:
    """Passages by row number from a memory-mapped Arrow file (no corpus in Python objects)."""

    def __init__(self, path: Path):
        self._table = ipc.open_file(pa.memory_map(str(path))).read_all()

    def __len__(self) -> int:
        return self._table.num_rows

    def fetch(self, rows: list[int]) -> list[dict]:
        """Passages (id, title, text) for the given row numbers, in order."""
        return self._table.take(pa.array(rows, type=pa.int64())).to_pylist()


class Retriever:
    """Query encoder + FAISS index + passage store, loaded once per replica.

    ``exact``: load the index files in ``cfg.index_dir`` itself, the version a run resolved
    (what the retrieval service does: a replica Serve restarts loads the same version again);
    otherwise ``cfg.index_dir`` may be a location, whose current version is loaded."""

    def __init__(self, cfg: RetrievalConfig, exact: bool = False):
        import faiss

        version = cfg.index_dir if exact else resolve_index(cfg.index_dir)
        if version is None:
            raise FileNotFoundError(f"no retrieval index at {cfg.index_dir}")
        self.version = version
        local = Path(io.localize(version, flat=True))  # remote: copied once per node
        self.meta = meta = read_meta(str(local))
        check_compatible(meta, cfg)
        self.encoder = Encoder(cfg)
        check_compatible(meta, cfg, self.encoder.dim)
        # MMAP_IFC also maps flat codes (Flat, HNSW storage): replicas on a node share the pages
        self.index = faiss.read_index(str(local / INDEX_FILE), faiss.IO_FLAG_MMAP_IFC)
        set_search_params(self.index, cfg.nprobe, cfg.ef_search, cfg.k_factor)
        if cfg.use_gpu:
            if faiss.get_num_gpus() == 0:
                raise RuntimeError("retrieval.use_gpu=true but FAISS sees no GPU (install faiss-gpu, "
                                   "give the retrieval service GPUs: retrieval.service.num_gpus)")
            self.index = faiss.index_cpu_to_all_gpus(self.index)
        self.store = PassageStore(local / PASSAGES_FILE)

    def search(self, queries: list[str], k: int) -> list[list[dict]]:
        """Top-k passages per query, each with its ``retrieval_score`` (inner product)."""
        if not queries:
            return []
        scores, rows = self.index.search(self.encoder.encode(queries), min(k, len(self.store)))
        results = []
        for score_row, id_row in zip(scores, rows):
            keep = [(int(i), float(s)) for i, s in zip(id_row, score_row) if i >= 0]
            passages = self.store.fetch([i for i, _ in keep])
            for passage, (_, score) in zip(passages, keep):
                passage["retrieval_score"] = score
            results.append(passages)
        return results
