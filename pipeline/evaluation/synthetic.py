"""The synthetic world's evaluation suite: query rows for the held-out questions and probe rows,
and the report computed from the annotated runs.

Rows (columns of ``SUITE_SCHEMA``; ``kind``, ``probe``, ``gold_passage_id``,
``original_value`` and ``swapped_value`` are carried through the annotation job unchanged):

- ``plain``: every sampled held-out question (knowledge, no-knowledge and long-form), no
  ``ctxs``, so a row that retrieves searches the index. Long-form questions (two attributes of
  one entity) carry task ``asqa``, so the job decodes them as trees (docs/algorithm.md, section 4).
- probes, one each per sampled knowledge question, each with exactly one passage in ``ctxs``:
  - ``gold``: the question's gold passage;
  - ``unrelated``: the passage of another entity (of the same type when there is one, so that
    only the name tells it apart), drawn with a seeded RNG;
  - ``counterfactual``: the gold passage with the asked attribute's value replaced (as a whole
    word, in title and text) by another value of the same pool, drawn with a seeded RNG; its
    ``answers`` are the swapped value.

Only the world's public API is used: ``questions(split, kind)``, ``passages``, ``entities``
(``name``, ``type``, ``attributes``), ``pools`` and ``attribute_spec(type, attr).pool``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Iterable

import pyarrow as pa

from ..selfrag.tokens import IRRELEVANT, RELEVANT
from .layouts import CTX_TYPE
from .metrics import (TokenInfo, first_token_is, fraction, match, passage_ids, rounded, stats,
                      well_formed)

SOURCE = "synthetic-eval"
KINDS = ("knowledge", "no_knowledge", "long_form")
PROBES = ("gold", "unrelated", "counterfactual")
MODES = ("adaptive", "never", "always")

SUITE_SCHEMA = pa.schema([
    ("id", pa.string()), ("instruction", pa.string()), ("input", pa.string()),
    ("task", pa.string()), ("answers", pa.list_(pa.string())), ("ctxs", pa.list_(CTX_TYPE)),
    ("source", pa.string()), ("kind", pa.string()), ("probe", pa.string()),
    ("gold_passage_id", pa.string()), ("original_value", pa.string()), ("swapped_value", pa.string()),
])


@dataclass
class Suite:
    """The rows of one evaluation suite."""

    plain: list[dict]
    probes: list[dict]
    #: Knowledge questions without probes, with the reason (e.g. no entity for the passage).
    skipped: list[str] = field(default_factory=list)


def _row(q: dict, probe: str, *, suffix: str = "", ctxs: list[dict] | None = None,
         answers: list[str] | None = None, original: str | None = None, swapped: str | None = None) -> dict:
    return {"id": q["id"] + suffix, "instruction": q["instruction"], "input": None, "task": q.get("task"),
            "answers": list(answers if answers is not None else q["answers"]), "ctxs": ctxs,
            "source": SOURCE, "kind": q["kind"], "probe": probe,
            "gold_passage_id": q.get("gold_passage_id"), "original_value": original, "swapped_value": swapped}


def _ctx(passage: dict, pid: str | None = None, title: str | None = None, text: str | None = None) -> dict:
    return {"id": pid or passage["id"], "title": passage["title"] if title is None else title,
            "text": passage["text"] if text is None else text, "score": None}


def _word(value: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(value)}(?!\w)")


def sample(questions: list[dict], limit: int | None, rng: random.Random) -> list[dict]:
    """At most ``limit`` questions (all when None or 0), drawn with ``rng``, in their original order."""
    if not limit or len(questions) <= limit:
        return list(questions)
    keep = set(rng.sample(range(len(questions)), limit))
    return [q for i, q in enumerate(questions) if i in keep]


def build_suite(world, max_per_kind: int | None = 200, seed: int = 0, split: str = "heldout") -> Suite:
    """The plain rows (at most ``max_per_kind`` questions of each kind of ``split``) and the
    probe rows of the sampled knowledge questions; deterministic for a world and ``seed``."""
    from ..synthetic.world import attribute_spec, passage_id

    sampler, prober = random.Random(seed), random.Random(seed + 1)
    picked = {kind: sample(world.questions(split, kind), max_per_kind, sampler) for kind in KINDS}
    plain = [_row(q, "plain") for kind in KINDS for q in picked[kind]]

    passages = {p["id"]: p for p in world.passages}
    owner = {passage_id(e): e for e in world.entities}
    probes, skipped = [], []
    for q in picked["knowledge"]:
        gold = passages.get(q.get("gold_passage_id"))
        entity = owner.get(q.get("gold_passage_id"))
        attr = q.get("attribute")
        if gold is None or entity is None or attr is None:
            skipped.append(f"{q['id']}: no gold passage, entity or attribute found")
            continue
        value = str(entity.attributes[attr])
        probes.append(_row(q, "gold", suffix="#gold", ctxs=[_ctx(gold)]))

        same_type = [e for e in owner.values() if e is not entity and e.type == entity.type]
        others = same_type or [e for e in owner.values() if e is not entity]
        other = others[prober.randrange(len(others))]
        probes.append(_row(q, "unrelated", suffix="#unrelated", ctxs=[_ctx(passages[passage_id(other)])]))

        pool = [str(v) for v in world.pools[attribute_spec(entity.type, attr).pool]]
        choices = [v for v in pool if v != value and not _word(v).search(gold["title"] + "\n" + gold["text"])]
        pattern = _word(value)
        if not choices or not pattern.search(gold["text"]):
            skipped.append(f"{q['id']}: cannot swap value {value!r} in the gold passage")
            continue
        new = choices[prober.randrange(len(choices))]
        ctx = _ctx(gold, pid=gold["id"] + "~cf", title=pattern.sub(new, gold["title"]),
                   text=pattern.sub(new, gold["text"]))
        probes.append(_row(q, "counterfactual", suffix="#counterfactual", ctxs=[ctx],
                           answers=[new], original=value, swapped=new))
    return Suite(plain=plain, probes=probes, skipped=skipped)


def suite_table(rows: list[dict]) -> pa.Table:
    """Suite rows as a table of ``SUITE_SCHEMA``."""
    return pa.Table.from_pylist(rows, schema=SUITE_SCHEMA)


# ----------------------------------------------------------------------------- report

def _first_candidate(row: dict) -> dict | None:
    """A probe row's only candidate (None when the row or the candidate failed)."""
    cands = row.get("candidates") or []
    return cands[0] if cands and cands[0].get("error") is None and row.get("error") is None else None


def _rate(values: Iterable[bool | None]) -> float | None:
    return rounded(fraction(values))


def is_plain(row: dict) -> bool:
    """A held-out question row (not a probe)."""
    return row.get("probe") in (None, "plain")


def mode_figures(mode: str, rows: list[dict] | None) -> dict:
    """Accuracy (match) and retrieval rate per kind of the plain rows of one run, and its
    error rows; all null when the run is missing."""
    plain = [r for r in rows or [] if is_plain(r)]
    by_kind = {k: stats([r for r in plain if r.get("kind") == k]) for k in KINDS}
    figures = {
        f"accuracy_{mode}": by_kind["knowledge"]["accuracy"],
        f"accuracy_{mode}_no_knowledge": by_kind["no_knowledge"]["accuracy"],
        f"accuracy_{mode}_all": stats(plain)["accuracy"],
        f"retrieval_rate_{mode}_knowledge": by_kind["knowledge"]["retrieval_rate"],
        f"retrieval_rate_{mode}_no_knowledge": by_kind["no_knowledge"]["retrieval_rate"],
        f"accuracy_{mode}_long_form": by_kind["long_form"]["accuracy"],
        f"retrieval_rate_{mode}_long_form": by_kind["long_form"]["retrieval_rate"],
    }
    figures = {k: (rounded(v) if rows is not None else None) for k, v in figures.items()}
    figures[f"error_rows_{mode}"] = sum(r.get("error") is not None for r in rows) if rows is not None else None
    return figures


def decision_figures(rows: list[dict] | None) -> dict:
    """Adaptive run, held-out knowledge and no-knowledge questions: the share whose retrieval
    decision is right (retrieve for knowledge, not for the others), as the run took it (its
    threshold) and as the model's own first token would (``retrieval_prob`` > 0.5)."""
    plain = [r for r in rows or [] if is_plain(r) and r.get("kind") in ("knowledge", "no_knowledge")]
    want = lambda r: r["kind"] == "knowledge"  # noqa: E731
    taken = [r.get("retrieved") == want(r) if r.get("retrieved") is not None else None for r in plain]
    own = [(r["retrieval_prob"] > 0.5) == want(r) if r.get("retrieval_prob") is not None else None for r in plain]
    return {"retrieval_decision_right": _rate(taken), "retrieval_decision_right_first_token": _rate(own)}


def citations_valid(row: dict) -> bool:
    """Whether every segment's citation ``[n]`` names ``docs[n-1]``, its own passage, and the
    numbers are 1, 2, ... in order of first citation."""
    docs, seen = row.get("docs") or [], 0
    for seg in row.get("segments") or []:
        n = seg.get("citation")
        if n is None:
            continue
        if not 1 <= n <= len(docs) or docs[n - 1].get("id") != seg.get("passage_id") or n > seen + 1:
            return False
        seen = max(seen, n)
    return seen == len(docs)


def long_form_figures(rows: list[dict] | None) -> dict:
    """Long-form rows of the adaptive run: retrieval rate, ``long_form_accuracy`` (every gold
    value in the answer; ``accuracy_adaptive_long_form`` asks for one), the share answered in
    two or more segments, the share whose tree went to depth 2 (repeated segments included),
    citations that point at the right ``docs`` entry, the gold passage among the docs, and
    error rows (which count as failures in the shares)."""
    lf = [r for r in rows or [] if is_plain(r) and r.get("kind") == "long_form"]
    every = lambda r: all(match(r.get("answer"), [g]) for g in r.get("answers") or [])  # noqa: E731
    figures = {
        "retrieval_rate_long_form": _rate(r.get("retrieved") for r in lf),
        "long_form_accuracy": _rate(r.get("error") is None and every(r) for r in lf),
        "long_form_two_segments": _rate(len(r.get("segments") or []) >= 2 for r in lf),
        "long_form_depth_two": _rate((r.get("path_depth") or 0) >= 2 for r in lf),
        "long_form_citations_valid": _rate(citations_valid(r) for r in lf if r.get("segments")),
        "long_form_gold_cited": _rate(r.get("gold_passage_id") in [d.get("id") for d in r.get("docs") or []]
                                      for r in lf if r.get("retrieved")),
        "long_form_error_rows": sum(r.get("error") is not None for r in lf),
    }
    return figures if rows is not None else {k: None for k in figures}


def report(runs: dict[str, list[dict]], tokens: TokenInfo | None) -> dict:
    """The evaluation report of the suite's annotated runs (``{mode: output rows}``); figures
    of a mode missing from ``runs`` are null. The keys are listed in ``jobs/evaluate.py``'s help."""
    out: dict = {}
    for mode in list(MODES) + [m for m in runs if m not in MODES]:
        out.update(mode_figures(mode, runs.get(mode)))
    out["retrieval_rate_knowledge"] = out["retrieval_rate_adaptive_knowledge"]
    out["retrieval_rate_no_knowledge"] = out["retrieval_rate_adaptive_no_knowledge"]
    out.update(decision_figures(runs.get("adaptive")))

    always = runs.get("always")
    probes = {p: [r for r in always or [] if r.get("probe") == p] for p in PROBES}
    rel_id, irr_id = (tokens.relevant, tokens.irrelevant) if tokens else (None, None)
    out["relevant_on_gold"] = _rate(first_token_is(_first_candidate(r), RELEVANT, rel_id)
                                    for r in probes["gold"])
    out["irrelevant_on_unrelated"] = _rate(first_token_is(_first_candidate(r), IRRELEVANT, irr_id)
                                           for r in probes["unrelated"])
    out["counterfactual_follow_rate"] = _rate(match(r.get("answer"), [r["swapped_value"]])
                                              for r in probes["counterfactual"])
    out["counterfactual_original_rate"] = _rate(match(r.get("answer"), [r["original_value"]])
                                                for r in probes["counterfactual"])
    out["accuracy_with_gold_ctx"] = rounded(stats(probes["gold"])["accuracy"])

    know = [r for r in always or [] if is_plain(r) and r.get("kind") == "knowledge"]
    out["gold_ranked_first"] = _rate(r.get("best_passage_id") == r.get("gold_passage_id") for r in know)
    out["gold_in_top_k"] = _rate(r.get("gold_passage_id") in passage_ids(r) for r in know)
    out["gold_retrieved_first"] = _rate(passage_ids(r)[:1] == [r.get("gold_passage_id")] for r in know)
    retrieved = [r for r in runs.get("adaptive") or []
                 if is_plain(r) and r.get("kind") == "knowledge" and r.get("retrieved")]
    out["gold_ranked_first_adaptive"] = _rate(r.get("best_passage_id") == r.get("gold_passage_id")
                                              for r in retrieved)

    wf = well_formed([r for rows in runs.values() for r in rows], tokens)
    out.update(well_formed_rate=wf["rate"], well_formed_checked=wf["checked"],
               well_formed_unchecked=wf["unchecked"],
               well_formed_text_proxy_unchecked=wf["text_proxy_unchecked"],
               well_formed_rate_always=well_formed(always or [], tokens)["rate"],
               probe_basis="token_ids" if tokens else "text")

    out.update(long_form_figures(runs.get("adaptive")))

    first = next(iter(runs.values()), [])
    out["n_knowledge"] = sum(is_plain(r) and r.get("kind") == "knowledge" for r in first)
    out["n_no_knowledge"] = sum(is_plain(r) and r.get("kind") == "no_knowledge" for r in first)
    out["n_long_form"] = sum(is_plain(r) and r.get("kind") == "long_form" for r in first)
    for p in PROBES:
        out[f"n_probe_{p}"] = len(probes[p])
    return out
