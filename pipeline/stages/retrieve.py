"""Retrieve stage (actor pool): top-k passages for the rows that asked for evidence.

Rows that bring their own ``ctxs`` use the first k of those; the others are encoded and
searched in the FAISS index. Rows that need no evidence, or have an error, pass through.
"""

from __future__ import annotations

import pyarrow as pa

import time

from ..config import Config
from ..metrics import Reporter
from ..retrieval.index import Retriever
from .columns import column, set_columns


def ctxs_to_passages(ctxs: list[dict], k: int) -> list[dict]:
    """Pre-retrieved passages in the output's passage layout (no retrieval score unless given)."""
    passages = []
    for ctx in ctxs[:k]:
        ctx = ctx or {}
        score = ctx.get("score", ctx.get("retrieval_score"))
        passages.append({
            "id": None if ctx.get("id") is None else str(ctx.get("id")),
            "title": ctx.get("title"), "text": ctx.get("text"),
            "retrieval_score": None if score is None else float(score),
        })
    return passages


class Retrieve:
    """Callable class for ``map_batches``: loads encoder, index and passage store once."""

    def __init__(self, cfg: Config):
        start = time.perf_counter()
        self.cfg = cfg
        self.retriever = Retriever(cfg.retrieval)
        self.reporter = Reporter("retrieve")
        self.reporter.report(init_seconds=time.perf_counter() - start)

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.reporter.batch(batch.num_rows):
            return self.process(batch)

    def process(self, batch: pa.Table) -> pa.Table:
        """Fill ``passages`` for the rows that retrieve."""
        cfg, k = self.cfg, self.cfg.selfrag.top_k
        passages = column(batch, "passages")
        questions = column(batch, cfg.input.question_column)
        ctxs = column(batch, cfg.input.ctxs_column)
        wanted = [i for i, (r, e) in enumerate(zip(column(batch, "retrieved"), column(batch, "error")))
                  if r and e is None]
        to_search = []
        for i in wanted:
            if ctxs[i]:
                passages[i] = ctxs_to_passages(ctxs[i], k)
            else:
                to_search.append(i)
        for i, found in zip(to_search, self.retriever.search([questions[i] for i in to_search], k)):
            passages[i] = found
        return set_columns(batch, {"passages": passages})
