"""Choosing the answer among evidence-conditioned candidates (docs/algorithm.md, section 3, steps 5-6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .tokens import strip_reflection_tokens


def clean_answer(raw: str) -> str:
    """Answer text: reflection tokens, ``</s>`` and paragraph markup removed, whitespace trimmed."""
    return strip_reflection_tokens(raw).strip()


def short_form_answer(raw: str) -> str:
    """A short-form answer: ``clean_answer``, then one leading ``#`` or ``:`` dropped, as the
    reference short-form script does to its predictions (a model may echo the end of an
    ``## Input:`` marker). Closed-set candidates are grouped on this text, so answers differing
    only in outer whitespace or that prefix are one answer here (the reference groups before
    stripping and keeps whitespace)."""
    answer = clean_answer(raw)
    return answer[1:].lstrip() if answer[:1] in ("#", ":") else answer


@dataclass
class Selection:
    """The chosen answer and the candidate it comes from."""

    answer: str
    index: int
    #: Closed-set tasks: summed final score per distinct answer, in first-seen order.
    answer_scores: dict[str, float] | None = None


def select_open(finals: Sequence[float]) -> int:
    """Index of the highest final score; ties go to the earliest candidate (best-ranked passage)."""
    if not finals:
        raise ValueError("no candidates to select from")
    best = 0
    for i, score in enumerate(finals):
        if score > finals[best]:
            best = i
    return best


def select_closed(answers: Sequence[str], finals: Sequence[float]) -> Selection:
    """Closed-set selection: sum final scores of identical answers, take the largest sum.

    Ties between sums go to the answer seen first in candidate order. The returned index is
    the best-scoring candidate within the winning answer's group.
    """
    if not answers:
        raise ValueError("no candidates to select from")
    sums: dict[str, float] = {}
    for answer, score in zip(answers, finals):
        sums[answer] = sums.get(answer, 0.0) + score
    winner = answers[0]
    for answer, total in sums.items():
        if total > sums[winner]:
            winner = answer
    members = [i for i, a in enumerate(answers) if a == winner]
    index = members[select_open([finals[i] for i in members])]
    return Selection(answer=winner, index=index, answer_scores=sums)


def select_answer(answers: Sequence[str], finals: Sequence[float], closed_set: bool) -> Selection:
    """Select among candidates: summed per answer for closed-set tasks, best single otherwise."""
    if closed_set:
        return select_closed(answers, finals)
    index = select_open(finals)
    return Selection(answer=answers[index], index=index)
