"""The run report's page: ``write_report`` writes ``report.html`` into an annotated output,
``write_evaluation_report`` one for an evaluation (``python -m jobs.report``, the annotation job
at the end of every run, and the evaluation job)."""

from __future__ import annotations

import json
from html import escape

from ..infra import io
from ..output.names import HISTORY_FILE, MANIFEST_FILE, REPORT_FILE
from .page import evaluation_section, history_section, render, run_sections
from .summary import COLUMNS, RunFigures

MANIFEST, HISTORY, REPORT = MANIFEST_FILE, HISTORY_FILE, REPORT_FILE


class ReportError(ValueError):
    """The location is not an annotated output (one line)."""


def read_manifest(path: str) -> dict:
    """The output's manifest; ReportError when there is none."""
    try:
        return json.loads(io.read_text(io.join(path, MANIFEST)))
    except FileNotFoundError:
        raise ReportError(f"{path} is not an annotated output: no {MANIFEST} there") from None
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read {io.join(path, MANIFEST)}: {type(exc).__name__}: {exc}") from None


def run_figures(path: str, manifest: dict) -> RunFigures:
    """The figures of every output shard in ``path``."""
    inp = (manifest.get("config") or {}).get("input") or {}
    task_column = inp.get("task_column", "task")
    figures = RunFigures()
    for shard in io.list_shards([path]):
        figures.add(io.read_columns(shard, (*COLUMNS, task_column)), task_column, inp.get("default_task"))
    return figures


def update_history(path: str, manifest: dict, figures: RunFigures) -> list[dict]:
    """The runs reported in this location (oldest first), this one appended once."""
    try:
        history = json.loads(io.read_text(io.join(path, HISTORY)))
    except (OSError, ValueError):
        history = []
    entry = {"finished_at": manifest.get("finished_at"), "run_id": manifest.get("run_id"),
             "annotation_hash": manifest.get("annotation_hash"),
             "rows_per_s": (manifest.get("this_run") or {}).get("rows_per_s"), **figures.overview()}
    if not any(h.get("finished_at") == entry["finished_at"] and h.get("run_id") == entry["run_id"] for h in history):
        history.append(entry)
        io.write_text(io.join(path, HISTORY), json.dumps(history, indent=1))
    return history


def header(path: str, manifest: dict) -> list[tuple[str, str]]:
    """The facts at the top of a run's page."""
    config = manifest.get("config") or {}
    return [("output", path), ("run", manifest.get("run_id")), ("finished", manifest.get("finished_at")),
            ("model", (config.get("engine") or {}).get("model")),
            ("mode", (config.get("selfrag") or {}).get("mode")),
            ("annotation hash", manifest.get("annotation_hash")), ("code version", manifest.get("code_version"))]


def write_report(path: str) -> str:
    """Write ``path``/report.html for an annotated output; returns the report's location."""
    manifest = read_manifest(path)
    figures = run_figures(path, manifest)
    history = update_history(path, manifest, figures)
    page = render("Self-RAG annotation run", header(path, manifest),
                  run_sections(figures, manifest) + history_section(history))
    dest = io.join(path, REPORT)
    io.write_text(dest, page)
    return dest


def write_evaluation_report(dest_dir: str, report: dict, outputs: dict[str, str]) -> str:
    """Write ``dest_dir``/report.html for an evaluation: the accuracy table per task and mode,
    then each mode's run (``outputs``: mode -> output location)."""
    sections = evaluation_section(report)
    for mode, path in outputs.items():
        sections.append(f"<h2>Mode {escape(mode)}: {escape(path)}</h2>")
        try:
            manifest = read_manifest(path)
        except ReportError as exc:
            sections.append(f'<p class="muted">{escape(str(exc))}</p>')
            continue
        sections += run_sections(run_figures(path, manifest), manifest)
    dest = io.join(dest_dir, REPORT)
    io.write_text(dest, render("Self-RAG evaluation", [("evaluation", dest_dir)], sections))
    return dest
