"""Quality filters (row-local), duplicate keys and the deterministic train/validation split."""

from __future__ import annotations

import hashlib

from ..selfrag.tokens import FULLY_SUPPORTED, ISSUP_GROUP
from .config import FiltersConfig, SCORE_KEYS
from .records import first_token, segment_passage, selected, strip_control

#: Every filter, in the order it applies; ``duplicates`` is the global one.
FILTER_ORDER = ("errors", "never_mode", "empty_or_echo", *SCORE_KEYS, "supported_only", "no_output", "duplicates")
_SCORE_FIELD = {"min_s_rel": "s_rel", "min_s_sup": "s_sup", "min_s_use": "s_use", "min_final": "final"}


def normalise(text: str | None) -> str:
    """Lowercase with whitespace collapsed (what "the same text" means for echo and duplicates)."""
    return " ".join((text or "").lower().split())


def forced_no_retrieval(row: dict) -> bool:
    """A row answered without evidence because the run forced it (``never`` mode): no retrieval
    probability, not retrieved, no candidates."""
    return row.get("retrieved") is False and row.get("retrieval_prob") is None and not row.get("candidates")


def evidence_items(row: dict) -> list[dict]:
    """The judged continuations behind the answer that used evidence: the selected candidate
    (short form) or the kept segments with a passage (long form; their step ``score`` as ``final``)."""
    if row.get("segments") is not None:
        return [{**s, "final": s.get("score")} for s in row["segments"] if segment_passage(row, s) is not None]
    chosen = selected(row)
    return [chosen[0]] if chosen else []


def drop_reason(row: dict, question: str | None, cfg: FiltersConfig, skip_never: bool) -> str | None:
    """The first row-local filter that drops the row (a name of FILTER_ORDER), or None."""
    if cfg.drop_errors and row.get("error") is not None:
        return "errors"
    if skip_never and forced_no_retrieval(row):
        return "never_mode"
    answer = normalise(strip_control(row.get("answer")))  # as exported: control strings stripped
    if cfg.drop_empty_or_echo and (not answer or answer == normalise(strip_control(question))):
        return "empty_or_echo"
    items = evidence_items(row)
    for key in SCORE_KEYS:
        minimum = getattr(cfg, key)
        if minimum is not None and any((it.get(_SCORE_FIELD[key]) or 0.0) < minimum for it in items):
            return key
    if cfg.supported_only and any(first_token(it.get("raw"), ISSUP_GROUP) != FULLY_SUPPORTED for it in items):
        return "supported_only"
    return None


def dedupe_key(instruction: str, input_text: str, answer: str) -> str:
    """Hash of the normalised instruction, input and answer (rows with equal keys are duplicates)."""
    text = "\x1f".join(normalise(t) for t in (instruction, input_text, answer))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def split_of(row_id: str, validation_fraction: float) -> str:
    """``validation`` or ``train``, from a hash of the id: the same id always lands in the same split."""
    bucket = int(hashlib.sha256(str(row_id).encode()).hexdigest()[:15], 16) / 16 ** 15
    return "validation" if bucket < validation_fraction else "train"
