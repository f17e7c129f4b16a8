"""Vector search over an index version: its shards, their merged top-k, and the exact re-ranking
by the float16 refine store.

Everything here takes query vectors and returns (scores, rows): float32 inner products and int64
passage-store rows, best first, ``-1`` rows (score ``-inf``) where fewer hits exist. The
encoder and the passage store are the retriever's (``index.Retriever``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .ondisk import ivfdata_name

#: The refine store of a version built with ``retrieval.refine=float16``: every vector in
#: float16, row i is passage i, raw (no header), rows read with pread.
REFINE_FILE = "vectors.f16"


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` hits per query over the hits of several shards (each (scores, rows) of
    shape (queries, k_i)): highest score first, ties by lower row; missing hits are row -1."""
    scores = np.concatenate([np.asarray(s, dtype=np.float32) for s, _ in parts], axis=1)
    rows = np.concatenate([np.asarray(r, dtype=np.int64) for _, r in parts], axis=1)
    scores = np.where(rows < 0, -np.inf, scores)
    order = np.lexsort((rows, -scores), axis=1)[:, :k]  # last key first: by -score, then by row
    top_scores, top_rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
    if top_rows.shape[1] < k:  # fewer candidates than k in all shards together
        pad = k - top_rows.shape[1]
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        top_rows = np.pad(top_rows, ((0, 0), (0, pad)), constant_values=-1)
    return top_scores, np.where(np.isneginf(top_scores), -1, top_rows)


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


class IndexShard:
    """One FAISS index file of a version, searched in place: IVF lists on disk are mapped (the
    ``.ivfdata`` beside the file), flat codes memory-mapped, so replicas on a node share pages."""

    def __init__(self, path: Path, nprobe: int, ef_search: int, k_factor: float, use_gpu: bool = False):
        import faiss

        on_disk = (path.parent / ivfdata_name(path.name)).exists()
        # IVF lists on disk: resolve the .ivfdata beside the file wherever the version now lies
        # (read-only: a version never changes, and may lie on a read-only mount or belong to another user)
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY if on_disk else faiss.IO_FLAG_MMAP_IFC
        self.index = faiss.read_index(str(path), flags)
        set_search_params(self.index, nprobe, ef_search, k_factor)
        if use_gpu:
            if faiss.get_num_gpus() == 0:
                raise RuntimeError("retrieval.use_gpu=true but FAISS sees no GPU (install faiss-gpu, "
                                   "give the replicas that search GPUs: retrieval.service.num_gpus, or "
                                   "retrieval.shard_service.num_gpus with shards_apart)")
            self.index = faiss.index_cpu_to_all_gpus(self.index)

    @property
    def ntotal(self) -> int:
        """Vectors in this shard."""
        return int(self.index.ntotal)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of this shard's best ``k`` hits per query."""
        if k <= 0 or self.index.ntotal == 0:
            return (np.full((len(vectors), max(k, 0)), -np.inf, np.float32),
                    np.full((len(vectors), max(k, 0)), -1, np.int64))
        return self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)


class RefineStore:
    """Every passage vector in float16 in a file: re-ranks a search's candidates by their exact
    inner product with the query, reading just the candidates' rows (the float32 vectors never
    need to be in RAM). Rows are read with ``pread``, not through a memory map: a mapped read
    also maps the pages around it, so the replica's RSS would grow to the whole file; read, the
    rows stay page cache that the kernel reclaims."""

    def __init__(self, path: Path, count: int, dim: int):
        expected = count * dim * 2
        if path.stat().st_size != expected:
            raise ValueError(f"{path} holds {path.stat().st_size} bytes, not {count} x {dim} float16 ({expected})")
        self.dim, self.row_bytes = dim, dim * 2
        self._fd = os.open(path, os.O_RDONLY)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The float32 vectors of the given rows (each in range)."""
        data = b"".join(os.pread(self._fd, self.row_bytes, int(r) * self.row_bytes) for r in rows)
        return np.frombuffer(data, dtype=np.float16).reshape(len(rows), self.dim).astype(np.float32)

    def rerank(self, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best ``k`` of each query's candidate ``rows`` (-1: none) by exact inner product."""
        valid = rows >= 0
        unique, where = np.unique(np.where(valid, rows, 0), return_inverse=True)
        picked = self.rows(unique)[where.reshape(rows.shape)]
        scores = np.einsum("qcd,qd->qc", picked, np.asarray(queries, dtype=np.float32))
        return merge_topk([(np.where(valid, scores, -np.inf), rows)], k)
