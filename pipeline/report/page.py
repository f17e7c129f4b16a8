"""The run report as one self-contained HTML page: inline CSS, inline SVG plots, no external
resource, so that it opens offline from object storage or a mail attachment."""

from __future__ import annotations

from datetime import datetime, timezone
from html import escape

from ..evaluation.synthetic import MODES
from . import svg
from .summary import BINS, SCORE_RANGES, RunFigures, throughput, timeline

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1000px; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 3px 10px; border: 1px solid #ddd; }
th { background: #f4f6f8; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
svg.plot { background: #fafbfc; border: 1px solid #e3e6ea; font-size: 10px; }
svg.plot .t { font-size: 12px; font-weight: 600; } svg.plot .axis { stroke: #888; }
svg.plot .empty { fill: #999; font-size: 12px; } .muted { color: #777; }
"""

#: Counts the plots in the page and those with data, for a reader (or a browser test) to check.
CHECK = """
document.body.dataset.plots = document.querySelectorAll("svg.plot").length;
document.body.dataset.emptyPlots = document.querySelectorAll('svg.plot[data-points="0"]').length;
"""


def table(header: list[str], rows: list[list]) -> str:
    """An HTML table; numbers are right-aligned."""
    def cell(v):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f'<td class="n">{v:,}</td>' if isinstance(v, int) else f'<td class="n">{v:.4g}</td>'
        return f"<td>{escape('' if v is None else str(v))}</td>"
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _counter_bars(counter, title: str, label=str) -> str:
    keys = sorted(counter)
    return svg.bars([label(k) for k in keys], [counter[k] for k in keys], title, ylabel="rows")


def run_sections(figures: RunFigures, manifest: dict) -> list[str]:
    """The report sections of one annotated run."""
    this_run, totals = manifest.get("this_run") or {}, manifest.get("totals") or {}
    overview = figures.overview()
    out = ["<h2>Counts</h2>", table(["", "value"], [
        ["rows in the output", overview["rows"]],
        ["error rows", overview["errors"]],
        ["retrieval rate (rows with a decision)", overview["retrieval_rate"]],
        ["long-form rows", overview["long_form_rows"]],
        ["rows annotated by this run", this_run.get("rows")],
        ["seconds of this run", this_run.get("seconds")],
        ["rows per second", this_run.get("rows_per_s")],
        ["shards in the output", totals.get("shards")],
    ])]
    if figures.errors:
        out += ["<h3>Errors by type</h3>", table(["error", "rows"], figures.errors.most_common())]
    tasks = sorted(figures.by_task)
    out += ["<h3>Retrieval by task</h3>", table(
        ["task", "rows", "with a decision", "retrieved", "retrieval rate"],
        [[t, *figures.by_task[t], round(figures.by_task[t][2] / figures.by_task[t][1], 4) if figures.by_task[t][1]
          else None] for t in tasks])]
    rates = [figures.by_task[t][2] / figures.by_task[t][1] if figures.by_task[t][1] else 0.0 for t in tasks]
    hist = figures.histograms
    plots = [svg.bars(tasks, rates, "Retrieval rate by task", value_format="{:.2f}"),
             svg.histogram(hist["retrieval_prob"].counts, *SCORE_RANGES["retrieval_prob"],
                           "Retrieval probability (first pass)", "P[Retrieval] / (P[Retrieval] + P[No Retrieval])")]
    plots += [svg.histogram(hist[k].counts, *SCORE_RANGES[k], f"{k} (candidates and long-form segments)", k)
              for k in ("s_rel", "s_sup", "s_use", "final")]
    plots += [_counter_bars(figures.winning_rank, "Rank of the winning passage", lambda k: f"#{k}"),
              svg.histogram(figures.answer_words.counts, 0, figures.answer_words.hi,
                            f"Answer length (words; the last of {BINS} bins: more)", "words")]
    if figures.long_form_depth:
        plots += [_counter_bars(figures.long_form_depth, "Long-form path depth"),
                  _counter_bars(figures.citations, "Citations per long-form answer")]
    out += ["<h2>Distributions</h2>", '<div class="plots">', *plots, "</div>"]
    stages = manifest.get("stages") or {}
    spans = timeline(stages)
    run_start = _run_start(manifest)
    out += ["<h2>Timeline</h2>", '<div class="plots">',
            svg.gantt(spans, "Stages: first to last batch (dark: busy)"),
            svg.line(throughput(manifest.get("shards") or [], run_start) if run_start else [],
                     "Rows written over time", "seconds since the start of the run", "rows"),
            "</div>"]
    engine = stages.get("engine") or {}
    if engine:
        keys = ("startups", "init_seconds", "requests", "prompt_tokens", "generated_tokens",
                "prefix_cache_hit_rate", "mean_running_requests", "mean_waiting_requests")
        out.append(table(["engine", "value"], [[k, engine.get(k)] for k in keys if k in engine]))
    if "lost" in stages:
        out.append(f'<p class="muted">Stage metrics were lost in this run ({escape(str(stages["lost"]))}).</p>')
    return out


def _run_start(manifest: dict) -> float | None:
    finished, seconds = manifest.get("finished_at"), (manifest.get("this_run") or {}).get("seconds")
    if not finished or seconds is None:
        return None
    end = datetime.strptime(finished, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    return end - float(seconds)


def history_section(history: list[dict]) -> list[str]:
    """The runs recorded in this location, latest last, with the change from the one before."""
    if len(history) < 2:
        return ["<h2>Earlier runs here</h2>", '<p class="muted">This is the first run reported in this location.</p>']
    rows = []
    for prev, cur in zip([None, *history], history):
        def delta(key):
            if prev is None or cur.get(key) is None or prev.get(key) is None:
                return None
            return round(cur[key] - prev[key], 4)
        rows.append([cur.get("finished_at"), cur.get("run_id"), cur.get("rows"), delta("rows"), cur.get("errors"),
                     delta("errors"), cur.get("retrieval_rate"), delta("retrieval_rate"), cur.get("rows_per_s")])
    points = [(float(i), float(h.get("retrieval_rate") or 0.0)) for i, h in enumerate(history)]
    return ["<h2>Earlier runs here</h2>",
            table(["finished", "run", "rows", "change", "errors", "change", "retrieval rate", "change", "rows/s"], rows),
            '<div class="plots">', svg.line(points, "Retrieval rate per run", "run (oldest first)", "rate"), "</div>"]


def evaluation_section(report: dict) -> list[str]:
    """Accuracy per task and mode of an evaluation report (``per_task``, or the synthetic keys)."""
    rows = []
    for mode, tasks in (report.get("per_task") or {}).items():
        for task, s in tasks.items():
            rows.append([mode, task, s.get("rows"), s.get("scored"), s.get("accuracy"), s.get("metric"),
                         s.get("retrieval_rate"), s.get("errors")])
    if not rows:  # synthetic report: accuracy_<mode>[_<kind>] keys
        for key, value in sorted(report.items()):
            if key.startswith("accuracy_") and isinstance(value, (int, float)):
                mode, _, kind = key[len("accuracy_"):].partition("_")
                if mode not in MODES:  # a probe figure, e.g. accuracy_with_gold_ctx
                    mode, kind = "always", key[len("accuracy_"):]
                rows.append([mode, kind or "knowledge", None, None, value, "match", None, None])
    labels = [f"{r[0]}/{r[1]}" for r in rows if r[4] is not None]
    values = [r[4] for r in rows if r[4] is not None]
    return ["<h2>Evaluation: accuracy per task and mode</h2>",
            table(["mode", "task", "rows", "scored", "accuracy", "metric", "retrieval rate", "errors"], rows),
            '<div class="plots">', svg.bars(labels, values, "Accuracy", value_format="{:.2f}"), "</div>"]


def render(title: str, header: list[tuple[str, str]], sections: list[str]) -> str:
    """The whole page."""
    meta = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in header)
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{escape(title)}</h1><table>{meta}</table>{''.join(sections)}"
            f"<script>{CHECK}</script></body></html>")
