"""Retrieve: top-k passages for the rows that asked for evidence.

Rows that bring their own ``ctxs`` use the first k usable ones; the others are searched through
the retrieval service in one call per batch. Rows that need no evidence, or have an error,
pass through.
"""

from __future__ import annotations

import pyarrow as pa

from ..infra.config import Config
from ..services.clients import ServiceUnavailable
from .columns import OUTPUT_TYPES
from .common import ServiceStage, StageLogic, run_isolated
from .contract import ANY, Contract


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


class Retrieve(StageLogic):
    """Fill ``passages`` for the rows that retrieve; a row that fails gets its ``error``."""

    name = "retrieve"

    @staticmethod
    def contract(cfg: Config) -> Contract:
        i = cfg.input
        return Contract("retrieve", reads={i.question_column: ANY, i.input_column: ANY, i.ctxs_column: ANY,
                                           "retrieved": pa.bool_(), "error": pa.string()},
                        writes={name: OUTPUT_TYPES[name] for name in ("passages", "ctxs_dropped", "error")},
                        optional=frozenset({i.input_column, i.ctxs_column}))

    async def process(self, view) -> dict:
        cfg, k = self.cfg, self.cfg.selfrag.top_k
        n = view.num_rows
        errors, retrieved = view["error"], view["retrieved"]
        questions, inputs, ctxs = view[cfg.input.question_column], view[cfg.input.input_column], view[cfg.input.ctxs_column]
        passages, dropped = [None] * n, [None] * n
        to_search = []
        for i in range(n):
            if not retrieved[i] or errors[i] is not None:
                continue
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
        found = await run_isolated(
            lambda idx: self.retriever.search([retrieval_query(questions[i], inputs[i]) for i in idx], k),
            to_search, fatal=(ServiceUnavailable,))
        for i, result in zip(to_search, found):
            if isinstance(result, Exception):
                errors[i] = f"retrieval error: {result}"
            else:
                passages[i] = result
        view.set(passages=passages, ctxs_dropped=dropped, error=errors)
        return {"searched": len(to_search)}


class RetrieveStage(ServiceStage):
    """Ray Data actor running ``Retrieve`` against the retrieval service."""

    logic = Retrieve
