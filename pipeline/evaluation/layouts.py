"""Readers of the official Self-RAG evaluation file layouts, converted to the pipeline's query rows.

Files are JSON Lines (``.jsonl``), a JSON list of records (``.json``) or Parquet (``.parquet``),
local or ``s3://``. Each file is read whole and checked before any work starts; a problem
raises ``LayoutError`` naming the file and the record.

Layouts (``--format``; ``auto`` picks one from the keys of the first record):

- ``qa``: ``question`` or ``instruction`` (``question`` wins when both are there), gold in
  ``answers`` or ``output`` (a string or a list of strings), optional ``input``, ``task``,
  ``id`` and ``ctxs`` (a list of ``{id?, title, text, score?}``). PopQA, TriviaQA and
  instruction/output files; the pipeline's own query shards read as this layout too.
- ``arc``: ARC-Challenge: ``question`` (a string, or the AI2 ``{"stem", "choices"}`` object),
  ``choices`` ``{"text": [...], "label": [...]}`` (or a list of ``{text, label}``) and
  ``answerKey``. Numeric labels ``1``..``5`` become ``A``..``E``. Task ``arc_c``; the
  instruction is the question followed by lines ``A: ...`` (the task's own instruction is
  prepended by ``pipeline.selfrag.prompts``, so it is not repeated here).
- ``pubhealth``: ``claim`` and ``label`` (``true``/``false``, ``SUPPORTS``/``REFUTES``, ...,
  see ``metrics.fever_label``); task ``fever``. Other labels (PubHealth's ``mixture`` and
  ``unproven``) are refused.

Output rows have the columns of ``QUERY_SCHEMA``: ``id``, ``instruction``, ``input``,
``task``, ``answers``, ``ctxs``, ``source`` (the file's name).
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..infra.io import Storage, is_remote
from ..selfrag.prompts import KNOWN_TASKS, TASK_INSTRUCTIONS
from .metrics import FEVER_LABELS, fever_label

LAYOUTS = ("qa", "arc", "pubhealth")
FORMATS = ("auto",) + LAYOUTS
EXTENSIONS = (".jsonl", ".json", ".parquet")

CTX_TYPE = pa.struct([("id", pa.string()), ("title", pa.string()), ("text", pa.string()),
                      ("score", pa.float64())])
QUERY_SCHEMA = pa.schema([
    ("id", pa.string()), ("instruction", pa.string()), ("input", pa.string()),
    ("task", pa.string()), ("answers", pa.list_(pa.string())), ("ctxs", pa.list_(CTX_TYPE)),
    ("source", pa.string()),
])
_NUMERIC_LABELS = {str(i + 1): letter for i, letter in enumerate("ABCDE")}


class LayoutError(ValueError):
    """An evaluation file that cannot be read or converted; raised before any work starts."""


# ----------------------------------------------------------------------------- reading

def expand(storage: Storage, paths: list[str]) -> list[str]:
    """Files to read: each path as given, a directory replaced by its ``.jsonl``/``.json``/
    ``.parquet`` files (sorted). Raises LayoutError for a path that does not exist."""
    files: list[str] = []
    for given in paths:
        try:
            fs, path = storage.filesystem(given)
            if fs.isdir(path):
                found = sorted(p for p in fs.find(path) if p.endswith(EXTENSIONS))
                if not found:
                    raise LayoutError(f"no {'/'.join(EXTENSIONS)} files in {given}")
                prefix = given.split("://", 1)[0] + "://" if is_remote(given) else ""
                files += [prefix + p for p in found]
            elif fs.exists(path):
                files.append(given)
            else:
                raise LayoutError(f"evaluation file not found: {given}")
        except LayoutError:
            raise
        except Exception as exc:  # permissions, endpoint, credentials: one line
            raise LayoutError(f"cannot read {given}: {type(exc).__name__}: {exc}") from None
    return files


def read_records(storage: Storage, path: str) -> list[tuple[str, dict]]:
    """The records of one file as ``(where, record)`` pairs, ``where`` naming the line (JSON
    Lines) or record position for messages. Raises LayoutError for an unreadable file."""
    try:
        fs, local = storage.filesystem(path)
        with fs.open(local, "rb") as f:
            data = f.read()
    except Exception as exc:  # noqa: BLE001 - any read failure is one message
        raise LayoutError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    if path.endswith(".parquet"):
        try:
            rows = pq.read_table(pa.BufferReader(data)).to_pylist()
        except Exception as exc:  # noqa: BLE001
            raise LayoutError(f"cannot read {path} as Parquet: {type(exc).__name__}: {exc}") from None
        pairs = [(f"row {i + 1}", r) for i, r in enumerate(rows)]
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise LayoutError(f"cannot read {path}: not UTF-8 text ({exc})") from None
        pairs = _parse_json(path, text)
    if not pairs:
        raise LayoutError(f"{path} holds no records")
    for where, record in pairs:
        if not isinstance(record, dict):
            raise LayoutError(f"{path} {where}: a record must be a JSON object, got {type(record).__name__}")
    return pairs


def _parse_json(path: str, text: str) -> list[tuple[str, Any]]:
    """A JSON list of records (``.json``, or any file whose whole text is a JSON list), else
    JSON Lines."""
    stripped = text.lstrip()
    if stripped.startswith("[") or path.endswith(".json"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as exc:
            if path.endswith(".json"):
                raise LayoutError(f"cannot read {path}: not valid JSON ({exc})") from None
        else:
            if isinstance(whole, dict) and isinstance(whole.get("data"), list):
                whole = whole["data"]
            if not isinstance(whole, list):
                raise LayoutError(f"cannot read {path}: expected a JSON list of records, got "
                                  f"{type(whole).__name__}")
            return [(f"record {i + 1}", r) for i, r in enumerate(whole)]
    pairs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            pairs.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise LayoutError(f"cannot read {path}: line {n} is not valid JSON ({exc.msg})") from None
    return pairs


def detect_layout(records: list[tuple[str, dict]], path: str) -> str:
    """The layout of a file, from the keys of its first record."""
    keys = set(records[0][1])
    if {"choices", "answerKey"} <= keys or ("answerKey" in keys and isinstance(records[0][1].get("question"), dict)):
        return "arc"
    if {"claim", "label"} <= keys:
        return "pubhealth"
    if "question" in keys or "instruction" in keys:
        return "qa"
    raise LayoutError(
        f"{path}: unknown layout (keys of the first record: {sorted(keys)}); expected "
        "question/instruction with answers/output (qa), question/choices/answerKey (arc) or "
        "claim/label (pubhealth)")


# ----------------------------------------------------------------------------- conversion

def _stem(path: str) -> str:
    name = posixpath.basename(path.rstrip("/"))
    for ext in EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _row_id(record: dict, path: str, offset: int) -> str:
    value = record.get("id", record.get("_id"))
    return f"{_stem(path)}:{offset}" if value is None else str(value)


def _fail(path: str, where: str, row_id: str, message: str) -> LayoutError:
    return LayoutError(f"{path} {where} (id {row_id}): {message}")


def strip_task_instruction(text: str, task: str | None) -> str:
    """The question without the task's own instruction (in either prompt style), for files that
    already prepend it (``pipeline.selfrag.prompts`` adds it again, and it must not appear twice)."""
    instructions = sorted({i[task] for i in TASK_INSTRUCTIONS.values() if task in i}, key=len, reverse=True)
    instruction = next((i for i in instructions if text.startswith(i)), None)
    if instruction is None:
        return text
    rest = text[len(instruction):].lstrip()
    for marker in ("### Input:", "## Input:"):
        if rest.startswith(marker):
            rest = rest[len(marker):].lstrip()
    return rest


def _ctxs(value: Any, fail) -> list[dict] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise fail(f"ctxs must be a list of passages, got {type(value).__name__}")
    out = []
    for j, ctx in enumerate(value):
        if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str):
            raise fail(f"ctxs[{j}] must be an object with a text string")
        score = ctx.get("score", ctx.get("retrieval_score"))
        try:
            score = None if score is None else float(score)
        except (TypeError, ValueError):
            score = None
        out.append({"id": None if ctx.get("id") is None else str(ctx["id"]),
                    "title": "" if ctx.get("title") is None else str(ctx["title"]),
                    "text": ctx["text"], "score": score})
    return out


def _golds(value: Any, fail) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                       for v in value):
        return [str(v) for v in value]
    raise fail(f"gold answers must be a string or a list of strings, got {value!r:.80}")


def _fever_golds(golds: list[str] | None, fail) -> list[str] | None:
    if golds is None:
        return None
    mapped = [fever_label(g) for g in golds]
    if None in mapped:
        raise fail(f"label {golds[mapped.index(None)]!r} is not a true/false label "
                   f"(known: {sorted(FEVER_LABELS)})")
    return mapped


def qa_row(record: dict, where: str, offset: int, path: str, task: str | None) -> dict:
    """One ``qa`` record as a query row (``task`` applies when the record has none)."""
    row_id = _row_id(record, path, offset)

    def fail(message: str) -> LayoutError:
        return _fail(path, where, row_id, message)

    question = record.get("question")
    if not (isinstance(question, str) and question.strip()):
        question = record.get("instruction")
    if not (isinstance(question, str) and question.strip()):
        raise fail("has no question or instruction string")
    row_task = record.get("task") or task
    if row_task is not None and row_task not in KNOWN_TASKS:
        raise fail(f"unknown task {row_task!r}; known tasks: {sorted(KNOWN_TASKS)}")
    input_text = record.get("input")
    if input_text is not None and not isinstance(input_text, str):
        raise fail(f"input must be a string, got {type(input_text).__name__}")
    golds = _golds(record["answers"] if record.get("answers") is not None else record.get("output"), fail)
    if row_task == "fever":
        golds = _fever_golds(golds, fail)
    return {"id": row_id, "instruction": strip_task_instruction(question, row_task),
            "input": input_text or None, "task": row_task, "answers": golds,
            "ctxs": _ctxs(record.get("ctxs"), fail), "source": posixpath.basename(path)}


def _arc_choices(record: dict, fail) -> list[tuple[str, str]]:
    question = record.get("question")
    choices = record.get("choices")
    if choices is None and isinstance(question, dict):
        choices = question.get("choices")
    if isinstance(choices, dict):
        texts, labels = choices.get("text"), choices.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
            raise fail("choices must have equally long text and label lists")
        pairs = list(zip(labels, texts))
    elif isinstance(choices, list) and all(isinstance(c, dict) for c in choices):
        pairs = [(c.get("label"), c.get("text")) for c in choices]
    else:
        raise fail("choices must be {text: [...], label: [...]} or a list of {text, label}")
    out = []
    for label, text in pairs:
        letter = _NUMERIC_LABELS.get(str(label).strip(), str(label).strip().upper())
        if len(letter) != 1 or not letter.isalpha() or not isinstance(text, str):
            raise fail(f"bad choice {label!r}: {text!r:.60}")
        out.append((letter, text))
    if len({letter for letter, _ in out}) != len(out) or not out:
        raise fail(f"choice labels must be distinct and non-empty: {[l for l, _ in out]}")
    return sorted(out)


def arc_row(record: dict, where: str, offset: int, path: str) -> dict:
    """One ARC-Challenge record as a query row (task ``arc_c``)."""
    row_id = _row_id(record, path, offset)

    def fail(message: str) -> LayoutError:
        return _fail(path, where, row_id, message)

    question = record.get("question")
    if isinstance(question, dict):
        question = question.get("stem")
    if not (isinstance(question, str) and question.strip()):
        raise fail("has no question string")
    choices = _arc_choices(record, fail)
    key = record.get("answerKey")
    letter = _NUMERIC_LABELS.get(str(key).strip(), str(key).strip().upper()) if key is not None else None
    if letter not in {l for l, _ in choices}:
        raise fail(f"answerKey {key!r} is not one of the choice labels {[l for l, _ in choices]}")
    question = strip_task_instruction(question.strip(), "arc_c")
    lines = [question] + [f"{l}: {t}" for l, t in choices]
    return {"id": row_id, "instruction": "\n".join(lines), "input": None, "task": "arc_c",
            "answers": [letter], "ctxs": _ctxs(record.get("ctxs"), fail),
            "source": posixpath.basename(path)}


def pubhealth_row(record: dict, where: str, offset: int, path: str) -> dict:
    """One PubHealth claim as a query row (task ``fever``, gold ``"true"``/``"false"``)."""
    row_id = _row_id(record, path, offset)

    def fail(message: str) -> LayoutError:
        return _fail(path, where, row_id, message)

    claim = record.get("claim")
    if not (isinstance(claim, str) and claim.strip()):
        raise fail("has no claim string")
    label = fever_label(record.get("label"))
    if label is None:
        raise fail(f"label {record.get('label')!r} is not a true/false label (known: "
                   f"{sorted(FEVER_LABELS)}; PubHealth's mixture/unproven claims are not part of "
                   "the paper's evaluation, leave them out)")
    return {"id": row_id, "instruction": strip_task_instruction(claim.strip(), "fever"),
            "input": None, "task": "fever", "answers": [label],
            "ctxs": _ctxs(record.get("ctxs"), fail), "source": posixpath.basename(path)}


def convert(records: list[tuple[str, dict]], layout: str, path: str, task: str | None = None) -> list[dict]:
    """Query rows of one file's records under ``layout``."""
    if layout == "qa":
        return [qa_row(r, w, i, path, task) for i, (w, r) in enumerate(records)]
    if layout == "arc":
        return [arc_row(r, w, i, path) for i, (w, r) in enumerate(records)]
    if layout == "pubhealth":
        return [pubhealth_row(r, w, i, path) for i, (w, r) in enumerate(records)]
    raise LayoutError(f"unknown format {layout!r}; one of {list(FORMATS)}")


def load_file(storage: Storage, path: str, fmt: str = "auto", task: str | None = None) -> tuple[str, list[dict]]:
    """``(layout, query rows)`` of one evaluation file."""
    if fmt not in FORMATS:
        raise LayoutError(f"unknown format {fmt!r}; one of {list(FORMATS)}")
    records = read_records(storage, path)
    layout = detect_layout(records, path) if fmt == "auto" else fmt
    return layout, convert(records, layout, path, task)


def query_table(rows: list[dict]) -> pa.Table:
    """Query rows as a table of ``QUERY_SCHEMA``."""
    return pa.Table.from_pylist(rows, schema=QUERY_SCHEMA)


def shard_names(paths: list[str]) -> list[str]:
    """One distinct Parquet shard name per file (its stem; a numeric prefix on collisions)."""
    stems = [_stem(p) for p in paths]
    return [f"{s}.parquet" if stems.count(s) == 1 else f"{i:02d}-{s}.parquet" for i, s in enumerate(stems)]
