"""A per-query Self-RAG baseline in the manner of the authors' reference short-form script, for
the benchmark: one question at a time, whole-vocabulary logprobs, the reference retrieval rule.

It is written independently of ``pipeline.selfrag`` (only the token strings are shared), so
that the benchmark's agreement count compares two implementations of the same algorithm:

- decision: generate one token with the logprobs of the whole vocabulary; retrieve iff
  ``lp[Retrieval] / (lp[Retrieval] + lp[No Retrieval]) > threshold`` on raw logprobs (missing
  ones count as -100), the reference script's rule;
- no retrieval: the answer is generated from ``prompt + [No Retrieval]``;
- retrieval: one generation per passage, all passages of the question in one call, each scored
  from its whole-vocabulary logprobs: relevance at the first position, support at the first
  ISSUP token, utility at the first utility token, optional ``exp(seq)``; open tasks take the
  best score, closed-set tasks (fever, arc_c) sum scores per answer.

Long-form rows (``annotate_long_form``) are decoded one question at a time as the authors'
static long-form script does: the decision as above, then the segment tree over the row's
passages (the same passages at every depth), every generation with whole-vocabulary logprobs.
The tree itself is the pipeline's (``pipeline.selfrag.longform``): for these rows the baseline
measures the per-query way of running it, and is no independent check of the tree.

Prompts are the pipeline's token ids (``PromptTokens``), so both sides condition on the same
tokens.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Sequence

from ..selfrag import tokens as T

MISSING = -100.0
CLOSED = ("fever", "arc_c")


@dataclass
class ReferenceSettings:
    """The knobs both sides set alike for the agreement check."""

    threshold: float = 0.2
    w_rel: float = 1.0
    w_sup: float = 1.0
    w_use: float = 1.0
    use_seqscore: bool = False


def _lp(position: dict, token_id: int) -> float:
    return position.get(token_id, MISSING)


def _clean(text: str) -> str:
    for token in T.ALL_REFLECTION_TOKENS + ("</s>", "<s>"):
        text = text.replace(token, "")
    return text.strip()


def _score(cont, ids, s: ReferenceSettings) -> float:
    first = cont.logprobs[0] if cont.logprobs else {}
    rel = {t: math.exp(_lp(first, ids[t])) for t in (T.RELEVANT, T.IRRELEVANT)}
    relevance = rel[T.RELEVANT] / sum(rel.values()) if sum(rel.values()) else 0.0

    def at_first(group):
        wanted = {ids[t] for t in group}
        for i, tid in enumerate(cont.token_ids):
            if tid in wanted and i < len(cont.logprobs):
                return {t: math.exp(_lp(cont.logprobs[i], ids[t])) for t in group}
        return None

    support, utility = 0.0, 0.0
    grd = at_first(T.ISSUP_GROUP)
    if grd and sum(grd.values()):
        total = sum(grd.values())
        support = grd[T.FULLY_SUPPORTED] / total + 0.5 * grd[T.PARTIALLY_SUPPORTED] / total
    ut = at_first(T.ISUSE_GROUP)
    if ut and sum(ut.values()):
        total = sum(ut.values())
        utility = sum(w * ut[t] / total for w, t in zip((-1.0, -0.5, 0.0, 0.5, 1.0), T.ISUSE_GROUP))
    seq = cont.cumulative_logprob / max(len(cont.token_ids), 1)
    final = s.w_rel * relevance + s.w_sup * support + s.w_use * utility
    return final + (math.exp(seq) if s.use_seqscore else 0.0)


def _decide(engine, prompt_ids: list[int], vocabulary: int, s: ReferenceSettings) -> bool:
    """The reference retrieval rule on one whole-vocabulary decision token."""
    ids = engine.ids
    (decision,) = engine.generate([prompt_ids], 1, vocabulary_logprobs=vocabulary)
    first = decision.logprobs[0] if decision.logprobs else {}
    lp_r, lp_n = _lp(first, ids[T.RETRIEVAL]), _lp(first, ids[T.NO_RETRIEVAL])
    return (lp_r / (lp_r + lp_n) if lp_r + lp_n else 0.0) > s.threshold


def _no_evidence(engine, tokens, prompt_ids: list[int], budget: int, vocabulary: int) -> dict:
    (cont,) = engine.generate([tokens.no_evidence(prompt_ids)], budget, vocabulary_logprobs=vocabulary)
    return {"retrieved": False, "answer": _clean(cont.text), "best_passage_id": None}


def annotate_one(engine, tokens, prompt_ids: list[int], passages: list[dict], task: str | None, budget: int,
                 vocabulary: int, s: ReferenceSettings) -> dict:
    """One question, the reference way; returns {retrieved, answer, best_passage_id}."""
    ids = engine.ids
    if not _decide(engine, prompt_ids, vocabulary, s) or not passages:
        return _no_evidence(engine, tokens, prompt_ids, budget, vocabulary)
    prompts = [tokens.evidence(prompt_ids, p["title"], p["text"]) for p in passages]
    conts = engine.generate(prompts, budget, vocabulary_logprobs=vocabulary)
    scored = [(_clean(c.text), _score(c, ids, s), p["id"]) for c, p in zip(conts, passages)]
    if task in CLOSED:
        sums: dict[str, float] = {}
        for answer, score, _ in scored:
            sums[answer] = sums.get(answer, 0.0) + score
        best_answer = max(sums, key=lambda a: (sums[a], -[x[0] for x in scored].index(a)))
        best = max((x for x in scored if x[0] == best_answer), key=lambda x: x[1])
    else:
        best = max(scored, key=lambda x: x[1])  # first of equal scores
    return {"retrieved": True, "answer": best[0], "best_passage_id": best[2]}


class _PerQueryStage:
    """What ``decode_tree`` asks of a stage, served by a synchronous engine in this process with
    whole-vocabulary logprobs; no retriever: the static script keeps the row's passages."""

    def __init__(self, cfg, engine, tokens, vocabulary: int):
        self.cfg, self.ids, self.tokens, self.retriever = cfg, engine.ids, tokens, None
        self.decode = lambda token_ids: engine.tokenizer.decode(token_ids, skip_special_tokens=False)
        self.engine = self
        self._engine, self._vocabulary = engine, vocabulary

    async def generate(self, prompts: Sequence[Sequence[int]], budgets: Sequence[int], route: str,
                       stop_ids: Sequence[int] = (), priority: int = 0) -> list:
        return self._engine.generate(prompts, list(budgets), stop_ids, vocabulary_logprobs=self._vocabulary)


def annotate_long_form(cfg, engine, tokens, row: dict, prompt_ids: list[int], budget: int, vocabulary: int,
                       s: ReferenceSettings) -> dict:
    """One long-form question, as the static long-form script does; returns {retrieved, answer,
    best_passage_id} (no single best passage: None)."""
    from ..stages.tree_decoding import decode_tree

    passages = row.get("passages") or []
    if not _decide(engine, prompt_ids, vocabulary, s) or not passages:
        return _no_evidence(engine, tokens, prompt_ids, budget, vocabulary)
    stage = _PerQueryStage(cfg, engine, tokens, vocabulary)
    result, _ = asyncio.run(decode_tree(stage, row["id"], row["prompt"], prompt_ids, row[cfg.input.question_column],
                                        passages, own_passages=True))
    return {"retrieved": True, "answer": result.text, "best_passage_id": None}
