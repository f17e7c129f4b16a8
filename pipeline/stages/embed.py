"""The index build's two stages (jobs.build_index): ``tokenize_passages`` (CPU tasks) adds the
passages' token ids, the ``EmbedPassages`` actors (the GPUs) turn them into a fixed-size list
column ``embedding``. Tokenizing ahead of the actors keeps the GPU from waiting for the tokenizer."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..infra.config import Config
from ..runtime.metrics_actor import Reporter
from ..retrieval.encoder import Encoder, encoder_tokenizer, tokenize
from ..retrieval.index import passage_texts


def with_embeddings(passages: pa.Table, vectors: np.ndarray) -> pa.Table:
    """The passages with an ``embedding`` column (fixed_size_list<float32>)."""
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel())
    return passages.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))


def tokenize_passages(batch: pa.Table, encoder: str, max_length: int) -> pa.Table:
    """The passages with their token ids as ``input_ids`` (list<int32>), for ``map_batches``."""
    ids, lengths = tokenize(encoder_tokenizer(encoder), passage_texts(batch), max_length)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    return batch.append_column("input_ids", pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)))


def split_embeddings(batch: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """(passages, n x dim float32 vectors) from a batch with an ``embedding`` column."""
    column = batch.column("embedding").combine_chunks()
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
    return batch.drop_columns(["embedding"]), vectors


class EmbedPassages:
    """Callable class for ``map_batches``: one encoder per actor; token ids in (``input_ids``, from
    ``tokenize_passages``), vectors out. A batch is sorted by token length, encoded in batches of
    ``retrieval.encode_batch_size`` and put back in order."""

    def __init__(self, cfg: Config):
        self.encoder = Encoder(cfg.retrieval)
        self.reporter = Reporter("embed")

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.reporter.batch(batch.num_rows):
            tokens = batch.column("input_ids").combine_chunks()
            vectors = self.encoder.encode_tokens(tokens.flatten().to_numpy(zero_copy_only=False),
                                                 tokens.value_lengths().to_numpy(zero_copy_only=False))
            return with_embeddings(batch.drop_columns(["input_ids"]), vectors)
