"""The run report (pipeline/report/write.py; python -m jobs.report): figures of a hand-made
output, the run history, and the page rendered by a real headless Chromium (Debian's package,
installed by `make test`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.report import main
from pipeline.report.examples import describe, pick
from pipeline.report.summary import error_kind
from pipeline.infra.io import Storage
from pipeline.output.folder import OutputFolder
from pipeline.report.write import write_report
from pipeline.stages.columns import OUTPUT_TYPES

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parents[1] / "outputs" / "report-screenshot.png"


def cand(pid, s_rel, s_sup, s_use, final):
    return {"passage_id": pid, "raw": "x", "answer": "x", "s_rel": s_rel, "s_sup": s_sup, "s_use": s_use,
            "seq": -0.1, "final": final, "error": None}


PASSAGES = [{"id": "p1", "title": "Dorsk", "text": "Dorsk is a city.", "retrieval_score": 0.9},
            {"id": "p2", "title": "Velmora", "text": "Velmora's capital is Dorsk.", "retrieval_score": 0.5}]
ROWS = [
    {"instruction": "Capital of Velmora?", "task": "popqa", "retrieved": True, "retrieval_prob": 0.9,
     "passages": PASSAGES, "candidates": [cand("p1", 0.2, 0.1, 0.0, 0.3), cand("p2", 0.95, 0.9, 1.0, 2.35)],
     "best_passage_id": "p2", "answer": "Dorsk is the capital."},
    {"instruction": "Say hello.", "task": None, "retrieved": False, "retrieval_prob": 0.05, "answer": "Hello!"},
    {"instruction": "Is Dorsk a city?", "task": "fever", "retrieved": True, "retrieval_prob": 0.7,
     "passages": PASSAGES[:1], "candidates": [cand("p1", 0.9, 0.8, 0.5, 1.95)], "best_passage_id": "p1",
     "answer": "true"},
    {"instruction": "Tell me about Velmora.", "task": "asqa", "retrieved": True, "retrieval_prob": 0.8,
     "segments": [{"text": "Velmora's capital is Dorsk [1].", "passage_id": "p2", "citation": 1, "s_rel": 0.9,
                   "s_sup": 1.0, "s_use": 0.5, "score": 2.1, "depth": 1}],
     "docs": PASSAGES[1:], "citations": [1], "path_depth": 1, "answer": "Velmora's capital is Dorsk [1]."},
    {"instruction": "x" * 3000, "task": "popqa", "retrieval_prob": None,
     "error": "prompt is 913 tokens; with 100 new tokens it exceeds max_model_len=1024"},
]
MANIFEST = {
    "run_id": "r1", "annotation_hash": "h1", "finished_at": "2026-12-01T10:00:50Z",
    "config": {"engine": {"model": "m"}, "selfrag": {"mode": "adaptive"}, "input": {"task_column": "task"}},
    "this_run": {"rows": 5, "seconds": 50.0, "rows_per_s": 0.1, "shards": 2}, "totals": {"shards": 2},
    "stages": {"engine": {"ready_at": 20.0, "first_start": 22.0, "last_end": 48.0, "requests": 9},
               "first_pass": {"first_start": 21.0, "last_end": 30.0, "seconds": 6.5},
               "critique": {"first_start": 31.0, "last_end": 47.0, "seconds": 14.0}},
    "shards": [{"rows": 3, "written_at": 1796119240.0}, {"rows": 2, "written_at": 1796119249.0}],
}


def table(rows: list[dict]) -> pa.Table:
    fields = [pa.field("instruction", pa.string()), pa.field("task", pa.string()),
              *(pa.field(name, OUTPUT_TYPES[name]) for name in OUTPUT_TYPES)]
    return pa.Table.from_pylist(rows, schema=pa.schema(fields))


def folder(path: Path) -> OutputFolder:
    """A local output location."""
    return OutputFolder(str(path), Storage())


@pytest.fixture
def output(tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(table(ROWS[:3]), out / "part-0.parquet")
    pq.write_table(table(ROWS[3:]), out / "part-1.parquet")
    (out / "_manifest.json").write_text(json.dumps(MANIFEST))
    return out


def plots(html: str) -> dict[str, int]:
    """Each plot's title -> the number of values it draws."""
    return {title: int(n) for n, title in
            re.findall(r'<svg class="plot" data-points="(\d+)"[^>]*><title>([^<]*)</title>', html)}


def test_figures_of_a_handmade_output(output):
    dest = write_report(folder(output))
    html = Path(dest).read_text()
    drawn = plots(html)
    assert drawn["Retrieval probability (first pass)"] == 4  # the error row has none
    # 3 candidates + 1 long-form segment
    assert all(drawn[f"{k} (candidates and long-form segments)"] == 4 for k in ("s_rel", "s_sup", "s_use", "final"))
    assert drawn["Rank of the winning passage"] == 2 and drawn["Answer length (words; the last of 20 bins: more)"] == 4
    assert drawn["Long-form path depth"] == 1 and drawn["Citations per long-form answer"] == 1
    assert drawn["Stages: first to last batch (dark: busy)"] == 4  # engine start-up + 3 stages
    assert drawn["Rows written over time"] == 3  # the start and two shards
    assert "<td>prompt is N tokens</td><td class=\"n\">1</td>" in html
    assert "<td>fever</td><td class=\"n\">1</td><td class=\"n\">1</td><td class=\"n\">1</td>" in html
    assert "This is the first run reported in this location." in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched


def test_a_second_run_in_the_same_location_is_compared_with_the_first(output):
    write_report(folder(output))
    write_report(folder(output))  # the same run reported again: recorded once
    assert len(json.loads((output / "_history.json").read_text())) == 1
    (output / "_manifest.json").write_text(json.dumps({**MANIFEST, "run_id": "r2", "finished_at": "2026-12-02T10:00:50Z"}))
    pq.write_table(table(ROWS[:2]), output / "part-2.parquet")
    html = Path(write_report(folder(output))).read_text()
    history = json.loads((output / "_history.json").read_text())
    assert [h["run_id"] for h in history] == ["r1", "r2"] and [h["rows"] for h in history] == [5, 7]
    assert "<td>r2</td><td class=\"n\">7</td><td class=\"n\">2</td>" in html  # rows, change
    assert plots(html)["Retrieval rate per run"] == 2


def test_not_an_output_is_one_line_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no _manifest.json" in err and err.count("\n") == 1


def test_error_kinds_drop_particulars():
    assert error_kind("engine error: EngineDeadError: x") == "engine error"
    assert error_kind("ctxs has no usable passage (3 dropped: null, or null/empty text)") == \
        "ctxs has no usable passage (N dropped"


def test_examples_show_a_long_form_answer_then_both_decisions():
    rows = table(ROWS).to_pylist()
    chosen = pick(rows, 3)
    assert [r["instruction"] for r in chosen] == ["Tell me about Velmora.", "Capital of Velmora?", "Say hello."]
    text = describe(chosen[1], chosen[1]["instruction"])
    assert "retrieved (P[Retrieval] 0.90)" in text and "'Velmora' (rank 2 of 2)" in text
    assert "final 2.35" in text and "A: Dorsk is the capital." in text
    assert "[1] Velmora" in describe(chosen[0], "Tell me about Velmora.")
    hostile = describe(chosen[2], "Say \x1b]0;owned\x07hello\x1b[2J.")
    assert "\x1b" not in hostile and "\x07" not in hostile and "Say ]0;owned hello [2J." in hostile


def render_in_chromium(page: Path, screenshot: Path | None = None) -> tuple[str, str]:
    """(the DOM after the page's script ran, Chromium's log) of a page opened by headless
    Chromium; with ``screenshot``, a PNG of it as well."""
    assert CHROMIUM, "Chromium is not installed: `make test` installs Debian's chromium package"
    profile = page.parent / "chromium-profile"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
             "--window-size=1100,3200"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        shot = subprocess.run([*flags, f"--screenshot={screenshot}", page.as_uri()], capture_output=True, text=True,
                              timeout=120)
        assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    return dom.stdout, dom.stderr


def check_in_browser(page: Path, screenshot: Path | None = None) -> int:
    """Render a report in Chromium: no console message, every plot drawn; returns the plot count."""
    dom, log = render_in_chromium(page, screenshot)
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert not console, console
    found = re.search(r'<body data-plots="(\d+)" data-empty-plots="(\d+)"', dom)
    assert found, dom[:500]  # the page's own script ran and counted the plots
    assert int(found.group(2)) == 0, f"{found.group(2)} empty plot(s)"
    return int(found.group(1))


def test_the_report_renders_in_a_browser_with_every_plot_drawn(output):
    page = Path(write_report(folder(output)))
    assert check_in_browser(page, SCREENSHOT) == len(plots(page.read_text())) == 12


def test_text_from_the_rows_is_escaped(tmp_path):
    """A hostile task name or error message is shown as text, never as markup."""
    out = tmp_path / "out"
    out.mkdir()
    rows = [{**ROWS[1], "task": "<b>x</b>"}, {**ROWS[4], "error": "<img src=x onerror=alert(1)>: boom"}]
    pq.write_table(table(rows), out / "part-0.parquet")
    (out / "_manifest.json").write_text(json.dumps({**MANIFEST, "run_id": "<script>alert(1)</script>"}))
    html = Path(write_report(folder(out))).read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img" not in html and "&lt;img src=x onerror=alert(N)&gt;" in html  # digits -> N: an error kind
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html
