"""Self-RAG scores computed from token ids and reflection-token logprobs (docs/algorithm.md, section 3).

Inputs are plain data: a ``Continuation`` holds the generated token ids and, for each
generated position, a dict ``{token_id: logprob}`` of the reflection tokens the engine
returned. A reflection token's probability that the engine did not return counts as 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from .tokens import (
    FULLY_SUPPORTED,
    IRRELEVANT,
    ISSUP_GROUP,
    ISUSE_GROUP,
    NO_RETRIEVAL,
    PARTIALLY_SUPPORTED,
    RELEVANT,
    RETRIEVAL,
    ReflectionIds,
)

Logprobs = Mapping[int, float]

#: Weights of [Utility:1] .. [Utility:5] in s_use.
UTILITY_WEIGHTS = (-1.0, -0.5, 0.0, 0.5, 1.0)

#: Value standing in for a missing logprob in the reference-compatible retrieval rule.
REFERENCE_MISSING_LOGPROB = -100.0

RETRIEVAL_MODES = ("adaptive", "always", "never")
RETRIEVAL_RULES = ("paper", "reference_logprob_ratio")


@dataclass
class Continuation:
    """One generated continuation, as plain data.

    ``logprobs[i]`` maps reflection token ids to their logprob at generated position ``i``.
    """

    token_ids: list[int]
    logprobs: list[dict[int, float]]
    cumulative_logprob: float = 0.0
    text: str = ""


@dataclass(frozen=True)
class ScoreWeights:
    """Weights of the final score. Defaults are the paper's (w_use 0.5, not the scripts' 1.0)."""

    w_rel: float = 1.0
    w_sup: float = 1.0
    w_use: float = 0.5
    use_seqscore: bool = False


@dataclass
class CandidateScores:
    """The critique scores of one continuation."""

    s_rel: float
    s_sup: float
    s_use: float
    seq: float
    final: float


def prob(logprobs: Logprobs, token_id: int) -> float:
    """exp(logprob) of a token, 0.0 when the engine did not return it."""
    lp = logprobs.get(token_id)
    return 0.0 if lp is None else math.exp(lp)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def retrieval_probability(first_position: Logprobs, ids: ReflectionIds, rule: str = "paper") -> float:
    """The retrieval test's left-hand side at the first generated position.

    ``paper``: p_R / (p_R + p_N) on probabilities (0.0 when neither token was returned).
    ``reference_logprob_ratio``: the reference script's lp_R / (lp_R + lp_N) on raw
    log-probabilities (missing ones count as -100), which inverts the test; offered only for
    comparison with the reference implementation.
    """
    if rule == "paper":
        p_r = prob(first_position, ids[RETRIEVAL])
        p_n = prob(first_position, ids[NO_RETRIEVAL])
        return _ratio(p_r, p_r + p_n)
    if rule == "reference_logprob_ratio":
        lp_r = first_position.get(ids[RETRIEVAL], REFERENCE_MISSING_LOGPROB)
        lp_n = first_position.get(ids[NO_RETRIEVAL], REFERENCE_MISSING_LOGPROB)
        return lp_r / (lp_r + lp_n) if lp_r + lp_n != 0 else 0.0
    raise ValueError(f"unknown retrieval rule {rule!r}; expected one of {RETRIEVAL_RULES}")


def decide_retrieval(mode: str, retrieval_prob: float | None, threshold: float) -> bool:
    """Whether to retrieve: ``always``, ``never``, or ``adaptive`` (prob > threshold)."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    if mode == "adaptive":
        if retrieval_prob is None:
            raise ValueError("adaptive mode needs a retrieval probability")
        return retrieval_prob > threshold
    raise ValueError(f"unknown retrieval mode {mode!r}; expected one of {RETRIEVAL_MODES}")


def relevance_score(cont: Continuation, ids: ReflectionIds) -> float:
    """s_rel = P([Relevant]) / (P([Relevant]) + P([Irrelevant])) at generated position 0."""
    if not cont.logprobs:
        return 0.0
    first = cont.logprobs[0]
    p_rel, p_irr = prob(first, ids[RELEVANT]), prob(first, ids[IRRELEVANT])
    return _ratio(p_rel, p_rel + p_irr)


def _first_position_of(cont: Continuation, group_ids: Sequence[int]) -> int | None:
    wanted = set(group_ids)
    for i, tid in enumerate(cont.token_ids):
        if tid in wanted:
            return i
    return None


def support_score(cont: Continuation, ids: ReflectionIds) -> float:
    """s_sup = P(full)/S + 0.5 * P(partial)/S at the first generated ISSUP token; 0 if none."""
    pos = _first_position_of(cont, ids.ids(ISSUP_GROUP))
    if pos is None or pos >= len(cont.logprobs):
        return 0.0
    at = cont.logprobs[pos]
    total = sum(prob(at, i) for i in ids.ids(ISSUP_GROUP))
    return _ratio(prob(at, ids[FULLY_SUPPORTED]) + 0.5 * prob(at, ids[PARTIALLY_SUPPORTED]), total)


def utility_score(cont: Continuation, ids: ReflectionIds) -> float:
    """s_use = sum_k w_k * P([Utility:k]) / S at the first generated utility token; 0 if none."""
    utility_ids = ids.ids(ISUSE_GROUP)
    pos = _first_position_of(cont, utility_ids)
    if pos is None or pos >= len(cont.logprobs):
        return 0.0
    probs = [prob(cont.logprobs[pos], i) for i in utility_ids]
    return _ratio(sum(w * p for w, p in zip(UTILITY_WEIGHTS, probs)), sum(probs))


def sequence_score(cont: Continuation) -> float:
    """seq = cumulative logprob / max(number of generated tokens, 1)."""
    return cont.cumulative_logprob / max(len(cont.token_ids), 1)


def final_score(s_rel: float, s_sup: float, s_use: float, seq: float, weights: ScoreWeights) -> float:
    """final = exp(seq) (only with use_seqscore) + w_rel*s_rel + w_sup*s_sup + w_use*s_use."""
    base = math.exp(seq) if weights.use_seqscore else 0.0
    return base + weights.w_rel * s_rel + weights.w_sup * s_sup + weights.w_use * s_use


def score_continuation(cont: Continuation, ids: ReflectionIds, weights: ScoreWeights) -> CandidateScores:
    """All critique scores of one evidence-conditioned continuation."""
    s_rel = relevance_score(cont, ids)
    s_sup = support_score(cont, ids)
    s_use = utility_score(cont, ids)
    seq = sequence_score(cont)
    return CandidateScores(s_rel, s_sup, s_use, seq, final_score(s_rel, s_sup, s_use, seq, weights))
