"""Evaluation metrics over annotated output rows (plain dicts, as ``Table.to_pylist()`` gives).

Pure functions: no Ray, no vLLM, no file access.

Accuracy, per row (``is_correct``):

- **Free-form tasks** (``popqa``, ``triviaqa``, ``qa``, no task, and any other open task) use
  the paper's ``match`` metric: the row is correct when some gold answer string occurs in the
  answer. As in the reference scripts this is a plain substring test (``"5"`` matches
  ``"15"``); unlike them, both sides are compared after ``strip()`` and ``casefold()``, so it is
  case-insensitive. Empty gold strings are ignored.
- **Closed-set tasks** use exact accuracy after normalising both sides:
  - ``fever``: the answer is stripped of whitespace and of surrounding ``. , ; : ! " '`` and
    lowercased; the gold is mapped to ``"true"``/``"false"`` by ``fever_label`` (which also
    understands ``SUPPORTS``/``REFUTES``). Correct iff they are equal.
  - ``arc_c``: the same stripping, uppercased; correct iff it equals the gold letter.
  - With ``closed_metric="substring"``, closed-set rows are scored as the authors' short-form
    script scores them with ``--metric match`` (which Table 2 of the paper used for PubHealth
    and ARC-Challenge too): an answer containing ``SUPPORTS``/``REFUTES`` becomes
    ``true``/``false``, then it is correct iff some gold string occurs in it, case-sensitive
    and not stripped.
- A row with an ``error`` (null answer) counts as wrong. A row without gold answers is not
  scored (it counts in ``rows`` but not in ``scored``).

Retrieval rate: rows with ``retrieved`` true over rows with a retrieval decision (``retrieved``
not null; rows that failed before the decision have none).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

CLOSED_SET_TASKS = ("fever", "arc_c")
#: How closed-set rows are scored: exact accuracy after normalising (default), or the
#: evaluation scripts' case-sensitive substring test.
CLOSED_METRICS = ("exact", "substring")
FREE_FORM_LABEL = "free-form"
_PUNCT = " \t\r\n.,;:!\"'"

#: Gold labels accepted for ``fever`` (PubHealth / FEVER), lowercased.
FEVER_LABELS = {
    "true": "true", "supports": "true", "supported": "true", "correct": "true", "yes": "true",
    "false": "false", "refutes": "false", "refuted": "false", "incorrect": "false", "no": "false",
}


def fever_label(value: Any) -> str | None:
    """``"true"``/``"false"`` for a truth label (bool, or a string such as ``"SUPPORTS"``,
    ``"False"``); None for anything else (``"mixture"``, ``"unproven"``, numbers)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return FEVER_LABELS.get(value.strip().lower())
    return None


def as_golds(answers: Any) -> list[str]:
    """Gold answers as a list of strings (a single string becomes a list of one; None -> [])."""
    if answers is None:
        return []
    if isinstance(answers, str):
        return [answers]
    return [str(a) for a in answers if a is not None]


def match(answer: str | None, golds: Iterable[str]) -> bool:
    """The paper's ``match``: some non-empty gold string occurs in the answer (case-insensitive
    substring test after stripping both)."""
    if answer is None:
        return False
    text = answer.strip().casefold()
    return any(g.strip() and g.strip().casefold() in text for g in golds)


def normalize_closed(answer: str, task: str) -> str:
    """A closed-set answer normalised for exact comparison (see the module docstring)."""
    text = answer.strip(_PUNCT)
    return text.upper() if task == "arc_c" else text.lower()


def exact(answer: str | None, golds: Iterable[str], task: str) -> bool:
    """Exact accuracy of a closed-set answer (``fever`` or ``arc_c``) against any gold."""
    if answer is None:
        return False
    got = normalize_closed(answer, task)
    if task == "fever":
        wanted = {fever_label(g) for g in golds} - {None}
    else:
        wanted = {normalize_closed(g, task) for g in golds}
    return got in wanted


def substring(answer: str | None, golds: Iterable[str]) -> bool:
    """The evaluation scripts' closed-set ``match``: ``SUPPORTS``/``REFUTES`` in the answer
    become ``true``/``false``; then some non-empty gold string occurs in it (case-sensitive)."""
    if answer is None:
        return False
    if "SUPPORTS" in answer:
        answer = "true"
    elif "REFUTES" in answer:
        answer = "false"
    return any(g and g in answer for g in golds)


def metric_name(task: str | None, closed_metric: str = "exact") -> str:
    """``closed_metric`` for closed-set tasks, ``"match"`` otherwise."""
    return closed_metric if task in CLOSED_SET_TASKS else "match"


def is_correct(answer: str | None, answers: Any, task: str | None, closed_metric: str = "exact") -> bool | None:
    """Whether an answer is correct for its gold answers under its task's metric; None when
    the row has no gold answer (not scored)."""
    golds = as_golds(answers)
    if not any(g.strip() for g in golds):
        return None
    if task in CLOSED_SET_TASKS:
        return substring(answer, golds) if closed_metric == "substring" else exact(answer, golds, task)
    return match(answer, golds)


def task_label(task: str | None) -> str:
    """The row's task as reported (``"free-form"`` for rows without one)."""
    return task if task else FREE_FORM_LABEL


def fraction(values: Iterable[bool | None]) -> float | None:
    """Share of True among the non-None values; None when there are none."""
    kept = [bool(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def stats(rows: Sequence[dict], task_column: str = "task", closed_metric: str = "exact") -> dict:
    """Counts and rates of a group of rows: ``rows``, ``errors``, ``scored``, ``correct``,
    ``accuracy`` (correct / scored), ``metric``, ``decided``, ``retrieved``,
    ``retrieval_rate`` (retrieved / decided)."""
    verdicts = [is_correct(r.get("answer"), r.get("answers"), r.get(task_column), closed_metric) for r in rows]
    scored = [v for v in verdicts if v is not None]
    decided = [r.get("retrieved") for r in rows if r.get("retrieved") is not None]
    metrics = sorted({metric_name(r.get(task_column), closed_metric) for r in rows})
    return {
        "rows": len(rows),
        "errors": sum(r.get("error") is not None for r in rows),
        "scored": len(scored),
        "correct": sum(scored),
        "accuracy": sum(scored) / len(scored) if scored else None,
        "metric": metrics[0] if len(metrics) == 1 else ("mixed" if metrics else None),
        "decided": len(decided),
        "retrieved": sum(bool(d) for d in decided),
        "retrieval_rate": sum(bool(d) for d in decided) / len(decided) if decided else None,
    }


def summarize(rows: Sequence[dict], key: Callable[[dict], str] | None = None,
              task_column: str = "task", closed_metric: str = "exact") -> dict:
    """``{"overall": stats(rows), "groups": {label: stats(group)}}``; groups by task by default
    (``key`` picks another grouping), in order of first appearance."""
    key = key or (lambda r: task_label(r.get(task_column)))
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return {"overall": stats(rows, task_column, closed_metric),
            "groups": {label: stats(group, task_column, closed_metric) for label, group in groups.items()}}


# ----------------------------------------------------------------------------- candidates

def chosen_candidate(row: dict) -> dict | None:
    """The candidate behind the row's answer: same passage as ``best_passage_id`` and the same
    raw text as ``answer_raw``; None for rows answered without evidence or failed."""
    candidates = row.get("candidates") or []
    if row.get("error") is not None or not candidates or row.get("answer_raw") is None:
        return None
    for cand in candidates:
        if cand.get("passage_id") == row.get("best_passage_id") and cand.get("raw") == row["answer_raw"]:
            return cand
    for cand in candidates:
        if cand.get("raw") == row["answer_raw"]:
            return cand
    return None


def candidate_for(row: dict, passage_id: str | None) -> dict | None:
    """The row's candidate conditioned on ``passage_id`` (the first when there are several)."""
    for cand in row.get("candidates") or []:
        if cand.get("passage_id") == passage_id and cand.get("error") is None:
            return cand
    return None


def first_token_is(candidate: dict | None, token: str, token_id: int | None) -> bool:
    """Whether a candidate's first generated token is ``token``: from its ``token_ids`` when
    recorded (``output.keep_logprobs=true``) and ``token_id`` is known, else from its ``raw``
    text (which keeps reflection tokens). A missing candidate counts as False."""
    if candidate is None:
        return False
    ids = candidate.get("token_ids")
    if ids is not None and token_id is not None:
        return len(ids) > 0 and ids[0] == token_id
    return (candidate.get("raw") or "").startswith(token)


def well_formed_ids(token_ids: Sequence[int] | None, utility_ids: Iterable[int],
                    eos_ids: Iterable[int]) -> bool | None:
    """Whether a generation ends with a ``[Utility:k]`` token directly followed by end of
    sequence; None when its token ids were not recorded."""
    if token_ids is None:
        return None
    ids = list(token_ids)
    return len(ids) >= 2 and ids[-1] in set(eos_ids) and ids[-2] in set(utility_ids)


_UTILITY_END = re.compile(r"\[Utility:[1-5]\]\s*(</s>)?\s*$")


def ends_with_utility_text(raw: str | None) -> bool | None:
    """Text-only proxy of ``well_formed_ids`` for generations whose token ids were not kept:
    the raw text ends with ``[Utility:k]`` (then ``</s>`` where the text was decoded with the
    special tokens, as long-form segments are). Without the end-of-sequence token in the text, a
    generation cut by its token budget right after a utility token counts too."""
    if raw is None:
        return None
    return bool(_UTILITY_END.search(raw))


def passage_ids(row: dict) -> list[str | None]:
    """Ids of the passages the row used, best first ([] when it used none)."""
    return [p.get("id") for p in row.get("passages") or []]


# ----------------------------------------------------------------------------- reports

@dataclass(frozen=True)
class TokenInfo:
    """Token ids the probes need, looked up from the model's tokenizer."""

    relevant: int
    irrelevant: int
    utility: tuple[int, ...]
    eos: tuple[int, ...]


def well_formed(rows: Iterable[dict], tokens: TokenInfo | None) -> dict:
    """Well-formedness of the generations behind the rows' answers.

    A generation is well formed when it ends with ``[Utility:k]`` followed by end of sequence,
    read from the row's ``answer_token_ids`` (or, in outputs without that column, the chosen
    candidate's ``token_ids``). Rows with neither (long-form rows, whose path may end in a
    segment dropped as a duplicate, or outputs written without ``output.keep_logprobs``) are
    counted as ``unchecked`` and get only the text proxy ``ends_with_utility_text(answer_raw)``
    (a long-form ``answer_raw`` is decoded with its special tokens, so it shows ``</s>``).
    """
    checked, unchecked = [], []
    for row in rows:
        if row.get("error") is not None or row.get("answer_raw") is None:
            continue
        ids = row.get("answer_token_ids")
        if ids is None:
            cand = chosen_candidate(row)
            ids = cand.get("token_ids") if cand else None
        if ids is not None and tokens is not None:
            checked.append(well_formed_ids(ids, tokens.utility, tokens.eos))
        else:
            unchecked.append(ends_with_utility_text(row["answer_raw"]))
    return {"rate": _rounded_fraction(checked), "checked": len(checked), "unchecked": len(unchecked),
            "text_proxy_unchecked": _rounded_fraction(unchecked)}


def rounded(value: float | None, digits: int = 4) -> float | None:
    """A figure rounded for the report (None stays None)."""
    return None if value is None else round(value, digits)


def report_runs(runs: dict[str, list[dict]], tokens: TokenInfo | None = None,
                task_column: str = "task", closed_metric: str = "exact") -> dict:
    """The report of annotated runs of one query set (``{label: rows}``, label = the mode):
    per run ``accuracy_<label>``, ``retrieval_rate_<label>``, ``error_rows_<label>``,
    ``rows_<label>`` over all rows, ``per_task`` (``{label: {task: stats}}``) and the
    well-formedness figures over all runs together."""
    out: dict = {}
    per_task: dict = {}
    for label, rows in runs.items():
        summary = summarize(rows, task_column=task_column, closed_metric=closed_metric)
        overall = summary["overall"]
        out[f"accuracy_{label}"] = rounded(overall["accuracy"])
        out[f"retrieval_rate_{label}"] = rounded(overall["retrieval_rate"])
        out[f"error_rows_{label}"] = overall["errors"]
        out[f"rows_{label}"] = overall["rows"]
        per_task[label] = {task: {**s, "accuracy": rounded(s["accuracy"]),
                                  "retrieval_rate": rounded(s["retrieval_rate"])}
                           for task, s in summary["groups"].items()}
    wf = well_formed([r for rows in runs.values() for r in rows], tokens)
    out.update(well_formed_rate=wf["rate"], well_formed_checked=wf["checked"],
               well_formed_unchecked=wf["unchecked"],
               well_formed_text_proxy_unchecked=wf["text_proxy_unchecked"], per_task=per_task)
    return out


def _rounded_fraction(values: Iterable[bool | None]) -> float | None:
    value = fraction(values)
    return None if value is None else round(value, 4)
