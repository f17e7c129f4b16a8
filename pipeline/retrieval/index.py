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
import math
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

from ..infra.config import RetrievalConfig
from ..infra.io import Storage, child, is_remote, join
from .corpus import read_corpus
from .encoder import Encoder
from .ondisk import OnDiskIVFWriter, ivf_of, training_sample_size
from .search import REFINE_FILE, IndexShard, RefineStore, merge_topk

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


def index_exists(storage: Storage, index_dir: str) -> bool:
    """Whether ``index_dir`` itself holds a complete index (one version; local or s3://): its
    metadata, passage store, and every index file the metadata names."""
    if not (storage.exists(join(index_dir, META_FILE)) and storage.exists(join(index_dir, PASSAGES_FILE))):
        return False
    return all(storage.exists(join(index_dir, f)) for f in index_files(read_meta(storage, index_dir)))


def index_files(meta: dict) -> list[str]:
    """The files besides meta.json and passages.arrow that a version needs (its shards, their
    on-disk lists, the refine store); versions built before shards hold one index.faiss."""
    return list(meta.get("index_files", [INDEX_FILE]))


def current_version(storage: Storage, location: str) -> str | None:
    """The version name the ``CURRENT`` pointer of an index location holds, or None without one."""
    pointer = join(location, CURRENT_FILE)
    if not storage.exists(pointer):
        return None
    name = storage.read_text(pointer).strip()
    if not name.startswith(VERSION_PREFIX) or any(ch in name for ch in "/\\\0"):
        raise ValueError(f"{pointer} does not name an index version ({name!r})")
    return name


def resolve_index(storage: Storage, index_dir: str) -> str | None:
    """The exact index version ``index_dir`` names now: the version its ``CURRENT`` points to, or
    ``index_dir`` itself when it holds an index directly (the old layout, or one version named on
    its own); None when it holds none. Resolve once per run (preflight), then read only the
    version returned: ``CURRENT`` may point elsewhere a moment later."""
    name = current_version(storage, index_dir)
    if name is not None:
        version = child(index_dir, name)
        if not index_exists(storage, version):
            raise FileNotFoundError(f"{join(index_dir, CURRENT_FILE)} names {name}, which is not a complete "
                                    "index (missing meta.json, passages.arrow or an index file its meta.json names)")
        return version
    return index_dir if index_exists(storage, index_dir) else None


def is_version(storage: Storage, index_dir: str) -> bool:
    """Whether ``index_dir`` is one version of an index location (built by ``build_version``:
    its ``meta.json`` records its own name). Versions are never built into or rebuilt."""
    if not storage.exists(join(index_dir, META_FILE)):
        return False
    return read_meta(storage, index_dir).get("version") == index_dir.rstrip("/").rsplit("/", 1)[-1]


def check_buildable(storage: Storage, location: str) -> None:
    """Refuse (ValueError) to build into one version of an index: only a location gets new versions."""
    if is_version(storage, location):
        parent = location.rstrip("/").rsplit("/", 1)[0]
        raise ValueError(f"{location} is one version of the index at {parent}, and a version is never rebuilt "
                         f"(a run may be reading it): build into the location {parent} instead")


def new_version_name() -> str:
    """A fresh version name: ``v-<UTC time>-<random>`` (sorts by build time, never reused)."""
    return f"{VERSION_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def build_version(storage: Storage, location: str, build: Callable[[str, dict], dict]) -> tuple[str, dict]:
    """Build a new version of the index at ``location`` and make it the current one; returns
    (the version's directory, its metadata).

    ``build(local_dir, extra_meta)`` writes the index files into the new, empty local directory
    (recording ``extra_meta`` in ``meta.json``) and returns the metadata. The version is written
    whole under a new name (locally into a hidden directory renamed into place; for s3:// into a
    local temporary directory, then uploaded), and only then does ``CURRENT`` switch to it by
    write-then-rename. No version is modified or deleted: a run reading an earlier one keeps it."""
    check_buildable(storage, location)
    name = new_version_name()
    version = child(location, name)
    if is_remote(location):
        with tempfile.TemporaryDirectory(prefix="selfrag-index-") as local:
            meta = build(local, {"version": name})
            storage.upload_dir(local, version)
    else:
        staging = Path(location) / f".{name}.building"
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            meta = build(str(staging), {"version": name})
            os.rename(staging, version)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    storage.write_text(join(location, CURRENT_FILE), name + "\n")
    log.info("index version %s is now current at %s", name, location)
    return version, meta


class IndexBuilder:
    """Builds an index directory from chunks of (passages, vectors) given in corpus order.

    Row i of the passage store is vector i of the index. A trainable index buffers the first
    training sample (``train_size``, capped at what k-means uses for the factory's lists), trains
    on it, then adds chunk by chunk. An IVF index is filled in pieces of ``build_piece_size``
    vectors written to disk and merged into on-disk inverted lists (``ondisk``), in
    ``retrieval.shards`` shard files; with ``retrieval.refine=float16`` every vector is also
    appended to the float16 refine store. The build's memory is the training sample, one chunk
    and one piece, whatever the corpus size (other factories hold their index in RAM).
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
        ivf = ivf_of(self.index)
        if ivf is not None and hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False  # codes for Hamming-filtered search, unused here; costs minutes
        if cfg.shards > 1 and ivf is None:
            raise ValueError(f"retrieval.shards={cfg.shards} needs an IVF factory whose lists can go to disk "
                             f"(e.g. IVF16384,PQ128), not {cfg.factory!r}")
        if ivf is not None and cfg.shards > ivf.nlist:
            raise ValueError(f"retrieval.shards={cfg.shards} is more than the {ivf.nlist} lists of {cfg.factory!r}")
        self.train_size = training_sample_size(cfg.train_size, ivf.nlist) if ivf is not None else cfg.train_size
        self.on_disk = ivf is not None
        self.lists: OnDiskIVFWriter | None = None  # made once the index is trained
        self.store = ipc.new_file(self.out / PASSAGES_FILE, PASSAGE_SCHEMA)
        self.refine = open(self.out / REFINE_FILE, "wb") if cfg.refine else None
        self.pending: list[np.ndarray] = []
        self.count = self.indexed = 0

    def add(self, passages: pa.Table, vectors: np.ndarray) -> None:
        """Append passages (id, title, text) and their vectors (n x dim, float32)."""
        if vectors.shape != (passages.num_rows, self.dim):
            raise ValueError(f"got {vectors.shape} vectors for {passages.num_rows} passages of dimension {self.dim}")
        self.store.write_table(passages.select(list(PASSAGE_SCHEMA.names)).cast(PASSAGE_SCHEMA))
        if self.refine is not None:
            self.refine.write(np.ascontiguousarray(vectors, dtype=np.float16).tobytes())
        self.count += passages.num_rows
        if self.index.is_trained:
            self._add(vectors)
            return
        self.pending.append(np.ascontiguousarray(vectors, dtype=np.float32))
        if sum(len(v) for v in self.pending) >= self.train_size:
            self._train_and_flush()

    def _add(self, vectors: np.ndarray) -> None:
        for start in range(0, len(vectors), self.cfg.add_chunk_size):
            chunk = np.ascontiguousarray(vectors[start:start + self.cfg.add_chunk_size], dtype=np.float32)
            if self.lists is not None:
                self.lists.add(chunk, self.indexed)
            else:
                self.index.add(chunk)
            self.indexed += len(chunk)

    def _train_and_flush(self) -> None:
        sample, self.pending = np.concatenate(self.pending), []  # one copy of the sample, not two
        log.info("training %s on %d vectors", self.cfg.factory, min(len(sample), self.train_size))
        try:
            self.index.train(sample[: self.train_size])
        except RuntimeError as exc:
            raise ValueError(f"cannot train index {self.cfg.factory!r} on {min(len(sample), self.train_size)} "
                             f"vectors (raise retrieval.train_size or use a smaller factory): "
                             f"{str(exc).splitlines()[-1]}") from None
        if self.on_disk:  # trained and empty: from now on the lists go to disk in pieces
            self.lists = OnDiskIVFWriter(self.index, self.out, self.cfg.build_piece_size, self.cfg.shards)
        self._add(sample)

    def close(self, extra_meta: dict | None = None) -> dict:
        """Train if still needed, write the index and the metadata; returns the metadata."""
        import faiss

        if not self.index.is_trained:
            self._train_and_flush()
        self.store.close()
        if self.refine is not None:
            self.refine.close()
        if self.lists is not None:
            files, indexed = self.lists.finish()
        else:
            faiss.write_index(self.index, str(self.out / INDEX_FILE))
            files, indexed = [INDEX_FILE], self.index.ntotal
        meta = {
            "encoder": self.cfg.encoder, "pooling": self.cfg.pooling, "normalize": self.cfg.normalize,
            "dim": self.dim, "metric": "inner_product", "factory": self.cfg.factory,
            "passages": self.count, "shards": [f for f in files if f.endswith(".faiss")],
            "index_files": files + ([REFINE_FILE] if self.refine is not None else []), "refine": self.cfg.refine,
            **(extra_meta or {}),
        }
        if indexed != self.count:
            raise RuntimeError(f"index holds {indexed} vectors for {self.count} passages")
        (self.out / META_FILE).write_text(json.dumps(meta, indent=2))
        return meta


def corpus_fingerprint(storage: Storage, path: str) -> dict:
    """Where the corpus came from and the SHA-256 of its bytes."""
    return {"corpus": path, "corpus_sha256": storage.sha256(path)}


def build_index_in_process(cfg: RetrievalConfig, storage: Storage, out_dir: str,
                           extra_meta: dict | None = None) -> dict:
    """Embed ``cfg.corpus`` in this process and build the index into the local ``out_dir``, which
    holds no index yet (small corpora: the embedded default; large ones use ``jobs.build_index``).
    A new version of an index location:
    ``build_version(storage, location, partial(build_index_in_process, cfg, storage))``."""
    start = time.time()
    corpus = read_corpus(storage, cfg.corpus)
    encoder = Encoder(cfg)
    builder = IndexBuilder(cfg, encoder.dim, out_dir)
    for chunk in corpus.to_batches(max_chunksize=cfg.add_chunk_size):
        chunk = pa.Table.from_batches([chunk])
        builder.add(chunk, encoder.encode(passage_texts(chunk)))
    meta = builder.close({**corpus_fingerprint(storage, cfg.corpus), **(extra_meta or {})})
    log.info("built index of %d passages in %.1fs at %s", corpus.num_rows, time.time() - start, out_dir)
    return meta


def read_meta(storage: Storage, index_dir: str) -> dict:
    """The index's metadata; FileNotFoundError naming the path when there is no index."""
    path = join(index_dir, META_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"no retrieval index at {index_dir} (missing {META_FILE})")
    return json.loads(storage.read_text(path))


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
    """Query encoder + FAISS index shards + refine store + passage store of one index version,
    loaded once per replica.

    ``exact``: load the index files in ``cfg.index_dir`` itself, the version a run resolved
    (what the retrieval service does: a replica Serve restarts loads the same version again);
    otherwise ``cfg.index_dir`` may be a location, whose current version is loaded. ``storage``
    reads it (a remote version is copied to its cache directory).
    ``load_shards=False``: the shards are searched elsewhere (``retrieval.shard_service``), and
    their hits come to ``rank``."""

    def __init__(self, cfg: RetrievalConfig, storage: Storage, exact: bool = False, load_shards: bool = True):
        version = cfg.index_dir if exact else resolve_index(storage, cfg.index_dir)
        if version is None:
            raise FileNotFoundError(f"no retrieval index at {cfg.index_dir}")
        self.cfg, self.version = cfg, version
        # remote: copied once per node (without the shards that other deployments search)
        only = None if load_shards else (META_FILE, PASSAGES_FILE, REFINE_FILE)
        local = Path(storage.localize(version, only=only, flat=True))
        self.meta = meta = read_meta(storage, str(local))
        if (cfg.refine or None) != meta.get("refine"):
            log.warning("retrieval.refine=%s, but the index version %s was built with refine=%s: searches follow "
                        "the version", cfg.refine, version, meta.get("refine"))
        check_compatible(meta, cfg)
        self.encoder = Encoder(cfg)
        if not self.encoder.probed:  # on a CPU: as it loads, not in its first search
            self.encoder.check_batch_invariance()
        check_compatible(meta, cfg, self.encoder.dim)
        shard_files = meta.get("shards", [INDEX_FILE])
        self.shards = [load_shard(cfg, local, name) for name in shard_files] if load_shards else []
        self.refine = RefineStore(local / REFINE_FILE, meta["passages"], meta["dim"]) if meta.get("refine") else None
        self.store = PassageStore(local / PASSAGES_FILE)

    def candidates(self, k: int) -> int:
        """Hits each shard returns for a top-``k`` search: ``k * k_factor`` when the refine store
        re-ranks them, else ``k`` (never more than the passages)."""
        k = min(k, len(self.store))
        return min(len(self.store), math.ceil(k * self.cfg.k_factor)) if self.refine is not None else k

    def rank(self, vectors: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray]], k: int):
        """(scores, rows) of the best ``k`` hits from the shards' hits ``parts``: merged, then
        re-ranked exactly by the refine store when the version has one."""
        k = min(k, len(self.store))
        if self.refine is None:
            return merge_topk(parts, k)
        return self.refine.rerank(vectors, merge_topk(parts, self.candidates(k))[1], k)

    def search_vectors(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the best ``k`` passages for each query vector (local shards)."""
        n = self.candidates(k)
        return self.rank(vectors, [shard.search(vectors, n) for shard in self.shards], k)

    def passages(self, scores: np.ndarray, rows: np.ndarray) -> list[list[dict]]:
        """The passages of ranked hits, each with its ``retrieval_score`` (inner product)."""
        results = []
        for score_row, id_row in zip(scores, rows):
            keep = [(int(i), float(s)) for i, s in zip(id_row, score_row) if i >= 0]
            passages = self.store.fetch([i for i, _ in keep])
            for passage, (_, score) in zip(passages, keep):
                passage["retrieval_score"] = score
            results.append(passages)
        return results

    def search(self, queries: list[str], k: int) -> list[list[dict]]:
        """Top-k passages per query, each with its ``retrieval_score`` (inner product)."""
        if not queries:
            return []
        return self.passages(*self.search_vectors(self.encoder.encode_queries(queries), k))


def load_shard(cfg: RetrievalConfig, version_dir: Path, name: str) -> IndexShard:
    """One index file of a local version, with the search parameters of ``cfg``."""
    return IndexShard(version_dir / name, cfg.nprobe, cfg.ef_search, cfg.k_factor, cfg.use_gpu)
