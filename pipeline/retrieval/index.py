"""FAISS index and passage store on disk: build once, then load memory-mapped.

An index directory holds ``index.faiss`` (inner-product FAISS index; row i is passage i),
``passages.arrow`` (Arrow IPC file with id, title, text, memory-mapped so replicas on a node
share the pages) and ``meta.json`` (encoder, pooling, normalisation, dimension, metric,
passage count, corpus fingerprint).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from .. import io
from ..config import RetrievalConfig
from .encoder import Encoder

log = logging.getLogger(__name__)

INDEX_FILE, PASSAGES_FILE, META_FILE = "index.faiss", "passages.arrow", "meta.json"


def passage_texts(table: pa.Table) -> list[str]:
    """What is embedded for each passage: ``title + " " + text``, as the paper's retriever does."""
    titles = table.column("title").to_pylist()
    texts = table.column("text").to_pylist()
    return [f"{ti or ''} {tx or ''}".strip() for ti, tx in zip(titles, texts)]


def index_exists(index_dir: str) -> bool:
    """Whether a complete index directory is present (local or s3://)."""
    return all(io.exists(io.join(index_dir, f)) for f in (INDEX_FILE, PASSAGES_FILE, META_FILE))


def build_flat_index(cfg: RetrievalConfig) -> dict:
    """Embed ``cfg.corpus`` and write an exact inner-product index to ``cfg.index_dir``."""
    import faiss

    start = time.time()
    corpus = io.read_table(cfg.corpus).select(["id", "title", "text"])
    corpus = corpus.set_column(0, "id", corpus.column("id").cast(pa.string()))
    encoder = Encoder(cfg)
    vectors = encoder.encode(passage_texts(corpus))
    index = faiss.IndexFlatIP(encoder.dim)
    index.add(vectors)
    out = Path(cfg.index_dir)
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out / INDEX_FILE))
    with ipc.new_file(out / PASSAGES_FILE, corpus.schema) as writer:
        writer.write_table(corpus)
    meta = {
        "encoder": cfg.encoder, "pooling": cfg.pooling, "normalize": cfg.normalize, "dim": encoder.dim,
        "metric": "inner_product", "factory": "Flat", "passages": corpus.num_rows,
        "corpus": cfg.corpus, "corpus_sha256": io.sha256(cfg.corpus),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    log.info("built index of %d passages in %.1fs at %s", corpus.num_rows, time.time() - start, out)
    return meta


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
    """Query encoder + FAISS index + passage store, loaded once per replica."""

    def __init__(self, cfg: RetrievalConfig):
        import faiss

        local = Path(io.localize(cfg.index_dir))  # remote: copied once per node
        meta = read_meta(str(local))
        check_compatible(meta, cfg)
        self.encoder = Encoder(cfg)
        check_compatible(meta, cfg, self.encoder.dim)
        self.index = faiss.read_index(str(local / INDEX_FILE), faiss.IO_FLAG_MMAP)
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
