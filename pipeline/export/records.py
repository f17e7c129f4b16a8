"""One annotated row as training examples: generator (the public Self-RAG training set's
format), critic (one example per judged aspect) and chat SFT.

The generator ``output`` interleaves the reflection tokens and the evidence as the model
produced them: ``[Retrieval]<paragraph>{title}\\n{text}</paragraph>`` followed by the selected
candidate's raw continuation, ``[No Retrieval]`` followed by the answer generated without
evidence, and for long-form rows each kept segment after its own passage. ``<s>``/``</s>``
are left out (a trainer appends its own end of sequence).

Text from the corpus, the input rows and the model's answers is text in the training data too.
A trainer tokenizes the exported strings with special-token parsing on, so a passage holding
``</paragraph>[Irrelevant]...</s><s>### Instruction:`` would close its paragraph early and put
the injected tokens in the loss. Every record is therefore built from scrubbed text
(``Scrub``): the control strings (``CONTROL_STRINGS``: the 15 reflection tokens, the special
tokens ``<s>``, ``</s>``, ``<unk>``, ``<pad>`` and the template markers) are stripped from
questions, inputs, passage titles and texts, and answers; a raw continuation keeps the
reflection tokens the model generated (they are its labels) but loses every other control
string, paragraph markup included (only the evidence wrapping opens and closes a paragraph).
"""

from __future__ import annotations

import math
import re

from ..infra.config import LongFormConfig
from ..selfrag.longform import cite
from ..selfrag.prompts import TEMPLATE_MARKERS, format_prompt, render, evidence_pieces, task_instruction
from ..selfrag.tokens import (ALL_REFLECTION_TOKENS, ISREL_GROUP, ISSUP_GROUP, ISUSE_GROUP, MARKUP, NO_RETRIEVAL,
                              RELEVANT, RETRIEVAL, RETRIEVE_GROUP, SPECIAL_TOKENS)


def _alternation(strings) -> re.Pattern:
    return re.compile("|".join(re.escape(t) for t in sorted(strings, key=len, reverse=True)))


_TOKEN_RE = _alternation(ALL_REFLECTION_TOKENS)
_EOS_RE = re.compile(r"</s>|<s>")
ASPECTS = {"isrel": ISREL_GROUP, "issup": ISSUP_GROUP, "isuse": ISUSE_GROUP}

#: Strings stripped from text (questions, inputs, titles, passages, answers) in every record:
#: the reflection tokens, the special tokens and the template markers.
CONTROL_STRINGS = ALL_REFLECTION_TOKENS + SPECIAL_TOKENS + TEMPLATE_MARKERS
#: Strings stripped from a raw continuation: all but the reflection tokens the model generated
#: (paragraph markup is stripped: only the evidence wrapping opens and closes a paragraph).
CONTINUATION_CONTROL_STRINGS = MARKUP + SPECIAL_TOKENS + TEMPLATE_MARKERS
_CONTROL_RE = _alternation(CONTROL_STRINGS)
_CONTINUATION_RE = _alternation(CONTINUATION_CONTROL_STRINGS)


def strip_control(text: str | None, pattern: re.Pattern = _CONTROL_RE) -> str | None:
    """``text`` without the control strings of ``pattern``, removed until none is left (removing one
    must not join its neighbours into another: ``<<s>/s>`` loses both)."""
    while text and (out := pattern.sub("", text)) != text:
        text = out
    return text


class Scrub:
    """Strips control strings from the text of records and counts what it changed: ``strings``
    (texts changed) and ``records`` (records holding one, as their builders report them)."""

    def __init__(self):
        self.strings = self.records = 0

    def _strip(self, text: str | None, pattern: re.Pattern) -> str | None:
        out = strip_control(text, pattern)
        self.strings += out != text
        return out

    def text(self, text: str | None) -> str | None:
        """Questions, inputs, titles, passages and answers: every control string stripped."""
        return self._strip(text, _CONTROL_RE)

    def continuation(self, raw: str | None) -> str | None:
        """A raw continuation: every control string but the generated reflection tokens stripped."""
        return self._strip(raw, _CONTINUATION_RE)

    def count_record(self, since: int) -> None:
        """Count one record as changed if any text was changed since ``strings`` was ``since``."""
        self.records += self.strings > since


def instruction_and_input(row: dict, columns: dict, scrub: Scrub | None = None) -> tuple[str, str]:
    """The row's instruction (its task template applied in the run's style, as in its prompt, to
    the scrubbed question) and scrubbed input ("" if none)."""
    scrub = scrub or Scrub()
    task = row.get(columns["task"]) or columns.get("default_task")
    long_form = LongFormConfig(tasks=list(columns.get("long_form_tasks", ()))).covers(task)
    question = scrub.text(row[columns["question"]])
    instruction = task_instruction(question, task, columns.get("prompt_style", "reference"), long_form)
    return instruction, scrub.text(row.get(columns["input"])) or ""


def dataset_name(row: dict, columns: dict) -> str:
    """The row's task, or ``free_form``."""
    return row.get(columns["task"]) or columns.get("default_task") or "free_form"


def evidence(passage: dict, scrub: Scrub | None = None) -> str:
    """``[Retrieval]<paragraph>{title}\\n{text}</paragraph>``, as the pipeline prompts with it (title
    and text scrubbed)."""
    scrub = scrub or Scrub()
    return render(evidence_pieces(scrub.text(passage.get("title")), scrub.text(passage.get("text"))))


def passage_text(passage: dict, scrub: Scrub) -> str:
    """``{title}\\n{text}`` of a passage, scrubbed (the critic's ``evidence``)."""
    return f"{scrub.text(passage.get('title')) or ''}\n{scrub.text(passage.get('text')) or ''}"


def trim(raw: str | None, scrub: Scrub | None = None) -> str:
    """A raw continuation without ``<s>``/``</s>`` and a trailing retrieval token (the next
    segment's evidence starts with its own), scrubbed of the other control strings."""
    text = (scrub or Scrub()).continuation(_EOS_RE.sub("", raw or "")).rstrip()
    return text[: -len(RETRIEVAL)] if text.endswith(RETRIEVAL) else text


def selected(row: dict) -> tuple[dict, dict] | None:
    """(candidate, passage) behind a short-form row's answer: the candidate and passage whose id is
    ``best_passage_id``; None for rows without evidence and long-form rows."""
    best = row.get("best_passage_id")
    if best is None or row.get("segments") is not None:
        return None
    cand = next((c for c in row.get("candidates") or [] if c.get("passage_id") == best), None)
    passage = next((p for p in row.get("passages") or [] if p.get("id") == best), None)
    return (cand, passage) if cand is not None and passage is not None else None


def segment_passage(row: dict, segment: dict) -> dict | None:
    """A long-form segment's passage: ``docs[citation-1]``, else the passage with its id."""
    docs = row.get("docs") or []
    n = segment.get("citation")
    if n is not None and 1 <= n <= len(docs):
        return docs[n - 1]
    pid = segment.get("passage_id")
    if pid is None:
        return None
    return next((p for p in docs + (row.get("passages") or []) if p.get("id") == pid), None)


def generator_output(row: dict, scrub: Scrub | None = None) -> str | None:
    """The generator target (see the module docstring); None for rows without an answer."""
    scrub = scrub or Scrub()
    if row.get("answer") is None:
        return None
    if row.get("segments") is not None:
        parts = []
        for seg in row["segments"]:
            passage, raw = segment_passage(row, seg), trim(seg.get("raw"), scrub)
            if passage is not None:
                parts.append(evidence(passage, scrub) + raw)
            else:
                parts.append(raw if raw.startswith(RETRIEVE_GROUP) else NO_RETRIEVAL + raw)
        return "".join(parts) or None
    chosen = selected(row)
    if chosen is not None:
        cand, passage = chosen
        return evidence(passage, scrub) + trim(cand.get("raw"), scrub)
    if row.get("retrieved"):
        return None  # evidence rows whose chosen candidate or passage cannot be found
    return NO_RETRIEVAL + trim(row.get("answer_raw"), scrub)


def generator_record(row: dict, columns: dict, row_id: str, scrub: Scrub | None = None) -> dict | None:
    """A row in ``selfrag/selfrag_train_data``'s format, or None without an output."""
    scrub = scrub or Scrub()
    since = scrub.strings
    output = generator_output(row, scrub)
    if output is None:
        return None
    instruction, input_text = instruction_and_input(row, columns, scrub)
    scrub.count_record(since)
    return {"instruction": instruction, "input": input_text, "output": output, "id": row_id,
            "dataset_name": dataset_name(row, columns)}


def first_token(raw: str | None, group: tuple[str, ...]) -> str | None:
    """The first reflection token of ``group`` in a raw continuation."""
    for match in _TOKEN_RE.finditer(raw or ""):
        if match.group(0) in group:
            return match.group(0)
    return None


def group_probability(item: dict, label: str, group: tuple[str, ...], ids: dict[str, int] | None) -> float | None:
    """P(label) / P(group) at the first generated position whose token is in ``group`` (from the
    run's ``keep_logprobs`` record and the tokenizer's reflection ids); None when not recorded."""
    token_ids, logprobs = item.get("token_ids"), item.get("reflection_logprobs")
    if not ids or not token_ids or not logprobs:
        return None
    group_ids = {ids[t] for t in group}
    pos = next((p for p, t in enumerate(token_ids) if t in group_ids), None)
    if pos is None or pos >= len(logprobs):
        return None
    order = list(ALL_REFLECTION_TOKENS)
    probs = {t: (math.exp(lp) if (lp := logprobs[pos][order.index(t)]) is not None else 0.0) for t in group}
    total = sum(probs.values())
    return probs[label] / total if total > 0 else None


def aspect_records(item: dict, passage: dict | None, output: str, scrub: Scrub | None = None) -> list[dict]:
    """Critic labels of one judged continuation (a candidate or a segment): ISREL (with
    evidence), ISSUP (with evidence) and ISUSE, each the token the model generated; evidence
    and output scrubbed (``_scrubbed``: whether that changed them)."""
    scrub = scrub or Scrub()
    since = scrub.strings
    evidence_text = "" if passage is None else passage_text(passage, scrub)
    output = scrub.text(output)
    changed = scrub.strings > since
    out = []
    for aspect, group in ASPECTS.items():
        if passage is None and aspect != "isuse":
            continue
        label = first_token(item.get("raw"), group)
        if label is None:
            continue
        score = item.get({"isrel": "s_rel", "issup": "s_sup", "isuse": "s_use"}[aspect])
        if aspect == "isrel":  # s_rel is exactly P([Relevant]) / (P([Relevant]) + P([Irrelevant]))
            prob = None if score is None else (score if label == RELEVANT else 1.0 - score)
        else:
            prob = None
        out.append({"aspect": aspect, "label": label, "probability": prob, "score": score,
                    "evidence": evidence_text, "output": output, "_item": item, "_group": group,
                    "_scrubbed": changed})
    return out


def critic_records(row: dict, columns: dict, row_id: str, ids: dict[str, int] | None = None,
                   scrub: Scrub | None = None) -> list[dict]:
    """One critic example per aspect the model judged: the retrieval decision (adaptive rows:
    the label it chose and ``p_R / (p_R + p_N)`` or its complement), ISREL / ISSUP / ISUSE of the
    selected candidate or of every kept long-form segment. ``probability`` is the label's share
    of its group at the position it was generated (ISSUP / ISUSE: only with the run's logprobs
    and ``ids``); ``score`` is the run's s_rel / s_sup / s_use."""
    if row.get("answer") is None:
        return []
    scrub = scrub or Scrub()
    since = scrub.strings
    instruction, input_text = instruction_and_input(row, columns, scrub)
    prompt_changed = scrub.strings > since
    found = []
    rp, retrieved = row.get("retrieval_prob"), row.get("retrieved")
    if rp is not None and retrieved is not None:
        found.append({"aspect": "retrieval", "label": RETRIEVAL if retrieved else NO_RETRIEVAL,
                      "probability": rp if retrieved else 1.0 - rp, "score": rp, "evidence": "", "output": ""})
    if row.get("segments") is not None:
        for seg in row["segments"]:
            found += aspect_records(seg, segment_passage(row, seg), seg.get("text") or "", scrub)
    elif (chosen := selected(row)) is not None:
        found += aspect_records(chosen[0], chosen[1], chosen[0].get("answer") or "", scrub)
    else:
        found += aspect_records({"raw": row.get("answer_raw")}, None, row.get("answer") or "", scrub)
    records = []
    for k, rec in enumerate(found):
        item, group = rec.pop("_item", None), rec.pop("_group", None)
        scrub.records += prompt_changed or rec.pop("_scrubbed", False)
        if item is not None and rec["aspect"] != "isrel":
            rec["probability"] = group_probability(item, rec["label"], group, ids)
        records.append({"id": f"{row_id}:{k}", "source_id": row_id, "instruction": instruction, "input": input_text,
                        **rec, "dataset_name": dataset_name(row, columns)})
    return records


def chat_record(row: dict, columns: dict, row_id: str, scrub: Scrub | None = None) -> dict | None:
    """``messages`` (user: the instruction and input; assistant: the answer, citing its passages
    as ``[n]``) and ``references`` (``[n]`` is ``references[n-1]``), all text scrubbed; None
    without an answer."""
    if row.get("answer") is None:
        return None
    scrub = scrub or Scrub()
    since = scrub.strings
    answer = scrub.text(row["answer"])
    instruction, input_text = instruction_and_input(row, columns, scrub)
    user = f"{instruction}\n\n{input_text}" if input_text else instruction
    if row.get("segments") is not None:
        refs = row.get("docs") or []
    elif (chosen := selected(row)) is not None:
        refs, answer = [chosen[1]], cite(answer, 1)
    else:
        refs = []
    references = [{"n": n, "id": p.get("id"), "title": scrub.text(p.get("title")), "text": scrub.text(p.get("text"))}
                  for n, p in enumerate(refs, 1)]
    scrub.count_record(since)
    return {"id": row_id, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "references": references, "dataset_name": dataset_name(row, columns)}


def prompt_of(record: dict) -> str:
    """The Self-RAG prompt of a generator record (``format_prompt`` of its instruction and input)."""
    return format_prompt(record["instruction"], record["input"] or None)
