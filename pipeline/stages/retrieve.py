"""Retrieve stage (actor pool): top-k passages for the rows that asked for evidence.

Rows that bring their own ``ctxs`` use the first k of those; the others are encoded and
searched in the FAISS index. Rows that need no evidence, or have an error, pass through.
"""

from __future__ import annotations

import time

import pyarrow as pa

from .. import io
from ..config import Config
from ..metrics import Reporter
from ..retrieval.index import Retriever
from .columns import column, set_columns
from .common import run_isolated


def retrieval_query(question: str, input_text: str | None) -> str:
    """The search query: the question, followed by the row's input text when it has one."""
    return f"{question} {input_text}" if input_text else question


def usable_ctx(ctx) -> bool:
    """Whether a pre-retrieved passage can be evidence: an entry with non-empty text."""
    return ctx is not None and ctx.get("text") is not None and bool(str(ctx.get("text")).strip())


def ctxs_to_passages(ctxs: list[dict], k: int) -> tuple[list[dict], int]:
    """The first k usable pre-retrieved passages in the output's passage layout (no retrieval
    score unless given), and how many entries were dropped as unusable (null, or null/empty text)."""
    usable = [ctx for ctx in ctxs if usable_ctx(ctx)]
    passages = []
    for ctx in usable[:k]:
        score = ctx.get("score", ctx.get("retrieval_score"))
        passages.append({
            "id": None if ctx.get("id") is None else str(ctx.get("id")),
            "title": None if ctx.get("title") is None else str(ctx.get("title")),
            "text": str(ctx.get("text")),
            "retrieval_score": None if score is None else float(score),
        })
    return passages, len(ctxs) - len(usable)


class Retrieve:
    """Callable class for ``map_batches``: loads encoder, index and passage store once."""

    def __init__(self, cfg: Config):
        start = time.perf_counter()
        self.cfg = cfg
        io.configure(cfg.storage)
        self.retriever = Retriever(cfg.retrieval)
        self.reporter = Reporter("retrieve")
        self.reporter.report(init_seconds=time.perf_counter() - start)

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.reporter.batch(batch.num_rows):
            return self.process(batch)

    def process(self, batch: pa.Table) -> pa.Table:
        """Fill ``passages`` for the rows that retrieve; a row that fails gets its ``error``."""
        cfg, k = self.cfg, self.cfg.selfrag.top_k
        passages, errors, dropped = column(batch, "passages"), column(batch, "error"), column(batch, "ctxs_dropped")
        queries = [retrieval_query(q, x) for q, x in
                   zip(column(batch, cfg.input.question_column), column(batch, cfg.input.input_column))]
        ctxs = column(batch, cfg.input.ctxs_column)
        wanted = [i for i, r in enumerate(column(batch, "retrieved")) if r and errors[i] is None]
        to_search = []
        for i in wanted:
            if not ctxs[i]:
                to_search.append(i)
                continue
            try:
                passages[i], dropped[i] = ctxs_to_passages(ctxs[i], k)
            except (AttributeError, TypeError, ValueError) as exc:
                errors[i] = f"bad ctxs: {exc}"
                continue
            if not passages[i]:
                passages[i] = None
                errors[i] = f"ctxs has no usable passage ({dropped[i]} dropped: null, or null/empty text)"
        found = run_isolated(lambda idx: self.retriever.search([queries[i] for i in idx], k), to_search)
        for i, result in zip(to_search, found):
            if isinstance(result, Exception):
                errors[i] = f"retrieval error: {result}"
            else:
                passages[i] = result
        return set_columns(batch, {"passages": passages, "error": errors, "ctxs_dropped": dropped})
