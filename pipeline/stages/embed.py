"""Embed stage (actor pool, for jobs.build_index): passages in, their vectors added as a
fixed-size list column ``embedding``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .. import io
from ..config import Config
from ..metrics import Reporter
from ..retrieval.encoder import Encoder
from ..retrieval.index import passage_texts


def with_embeddings(passages: pa.Table, vectors: np.ndarray) -> pa.Table:
    """The passages with an ``embedding`` column (fixed_size_list<float32>)."""
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel())
    return passages.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))


def split_embeddings(batch: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """(passages, n x dim float32 vectors) from a batch with an ``embedding`` column."""
    column = batch.column("embedding").combine_chunks()
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
    return batch.drop_columns(["embedding"]), vectors


class EmbedPassages:
    """Callable class for ``map_batches``: one encoder per actor."""

    def __init__(self, cfg: Config):
        io.configure(cfg.storage)
        self.encoder = Encoder(cfg.retrieval)
        self.reporter = Reporter("embed")

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.reporter.batch(batch.num_rows):
            return with_embeddings(batch, self.encoder.encode(passage_texts(batch)))
