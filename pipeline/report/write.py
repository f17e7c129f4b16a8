"""The run report's page: ``write_report`` writes ``report.html`` into an annotated output,
``write_evaluation_report`` one for an evaluation (``python -m jobs.report``, the annotation job
at the end of every run, and the evaluation job)."""

from __future__ import annotations

import json
from html import escape

from ..output.folder import MANIFEST_FILE, OutputFolder
from .page import evaluation_section, history_section, render, run_sections
from .summary import COLUMNS, RunFigures


class ReportError(ValueError):
    """The location is not an annotated output (one line)."""


def read_manifest(output: OutputFolder) -> dict:
    """The output's manifest; ReportError when there is none."""
    try:
        return json.loads(output.read_text(output.manifest_file))
    except FileNotFoundError:
        raise ReportError(f"{output.path} is not an annotated output: no {MANIFEST_FILE} there") from None
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read {output.manifest_file}: {type(exc).__name__}: {exc}") from None


def run_figures(output: OutputFolder, manifest: dict) -> RunFigures:
    """The figures of every output shard in ``output``."""
    inp = (manifest.get("config") or {}).get("input") or {}
    task_column = inp.get("task_column", "task")
    figures = RunFigures()
    for shard in output.list_shards():
        figures.add(output.storage.read_columns(shard, (*COLUMNS, task_column)), task_column, inp.get("default_task"))
    return figures


def update_history(output: OutputFolder, manifest: dict, figures: RunFigures) -> list[dict]:
    """The runs reported in this location (oldest first), this one appended once."""
    try:
        history = json.loads(output.read_text(output.history_file))
    except (OSError, ValueError):
        history = []
    entry = {"finished_at": manifest.get("finished_at"), "run_id": manifest.get("run_id"),
             "annotation_hash": manifest.get("annotation_hash"),
             "rows_per_s": (manifest.get("this_run") or {}).get("rows_per_s"), **figures.overview()}
    if not any(h.get("finished_at") == entry["finished_at"] and h.get("run_id") == entry["run_id"] for h in history):
        history.append(entry)
        output.write_json(output.history_file, history, indent=1)
    return history


def header(path: str, manifest: dict) -> list[tuple[str, str]]:
    """The facts at the top of a run's page."""
    config = manifest.get("config") or {}
    return [("output", path), ("run", manifest.get("run_id")), ("finished", manifest.get("finished_at")),
            ("model", (config.get("engine") or {}).get("model")),
            ("mode", (config.get("selfrag") or {}).get("mode")),
            ("annotation hash", manifest.get("annotation_hash")), ("code version", manifest.get("code_version"))]


def write_report(output: OutputFolder) -> str:
    """Write the report page of an annotated output; returns the report's location."""
    manifest = read_manifest(output)
    figures = run_figures(output, manifest)
    history = update_history(output, manifest, figures)
    page = render("Self-RAG annotation run", header(output.path, manifest),
                  run_sections(figures, manifest) + history_section(history))
    output.write_text(output.report_file, page)
    return output.report_file


def write_evaluation_report(dest: OutputFolder, report: dict, outputs: dict[str, OutputFolder]) -> str:
    """Write the report page of an evaluation into ``dest``: the accuracy table per task and
    mode, then each mode's run (``outputs``: mode -> its output)."""
    sections = evaluation_section(report)
    for mode, output in outputs.items():
        sections.append(f"<h2>Mode {escape(mode)}: {escape(output.path)}</h2>")
        try:
            manifest = read_manifest(output)
        except ReportError as exc:
            sections.append(f'<p class="muted">{escape(str(exc))}</p>')
            continue
        sections += run_sections(run_figures(output, manifest), manifest)
    dest.write_text(dest.report_file, render("Self-RAG evaluation", [("evaluation", dest.path)], sections))
    return dest.report_file
