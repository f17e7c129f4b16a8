"""The figures of a run report, accumulated shard by shard (memory bounded by the bins, not by
the rows). Pure Python over Arrow tables: no Ray, no vLLM, no file access."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

BINS = 20
SCORES = ("s_rel", "s_sup", "s_use", "final")
#: Value ranges of the score histograms (final: w_rel + w_sup + w_use at most, seq score aside).
SCORE_RANGES = {"retrieval_prob": (0.0, 1.0), "s_rel": (0.0, 1.0), "s_sup": (0.0, 1.0), "s_use": (-1.0, 1.0),
                "final": (-0.5, 2.5)}
ANSWER_WORDS_MAX = 100
#: Columns the report reads from each output shard (those present).
COLUMNS = ("error", "retrieved", "retrieval_prob", "candidates", "segments", "best_passage_id", "passages",
           "answer", "path_depth", "citations")


@dataclass
class Histogram:
    """Counts of ``BINS`` equal bins over ``[lo, hi]`` (values outside are clamped)."""

    lo: float
    hi: float
    counts: list[int] = field(default_factory=lambda: [0] * BINS)

    def add(self, value: float | None) -> None:
        """Count one value (None is ignored)."""
        if value is None:
            return
        i = int((value - self.lo) / (self.hi - self.lo) * BINS)
        self.counts[min(max(i, 0), BINS - 1)] += 1


def error_kind(error: str) -> str:
    """An error message without its particulars: the part before the first colon, with numbers
    replaced by ``N`` (``prompt is 913 tokens; ...`` -> ``prompt is N tokens``)."""
    head = error.split(":", 1)[0].split(";", 1)[0].strip()
    return re.sub(r"\d+", "N", head)[:60] or "error"


@dataclass
class RunFigures:
    """What the report shows of a run's rows."""

    rows: int = 0
    errors: Counter = field(default_factory=Counter)
    by_task: dict = field(default_factory=dict)  # task -> [rows, decided, retrieved]
    histograms: dict = field(default_factory=lambda: {k: Histogram(*r) for k, r in SCORE_RANGES.items()})
    winning_rank: Counter = field(default_factory=Counter)
    answer_words: Histogram = field(default_factory=lambda: Histogram(0, ANSWER_WORDS_MAX))
    long_form_depth: Counter = field(default_factory=Counter)
    citations: Counter = field(default_factory=Counter)

    def add(self, table: pa.Table, task_column: str, default_task: str | None = None) -> None:
        """Accumulate one shard's rows."""
        cols = {name: table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
                for name in (*COLUMNS, task_column)}
        for i in range(table.num_rows):
            row = {name: values[i] for name, values in cols.items()}
            self._add_row(row, row.get(task_column) or default_task or "free-form")

    def _add_row(self, r: dict, task: str) -> None:
        self.rows += 1
        if r["error"]:
            self.errors[error_kind(r["error"])] += 1
        counts = self.by_task.setdefault(task, [0, 0, 0])
        counts[0] += 1
        if r["retrieved"] is not None:
            counts[1] += 1
            counts[2] += bool(r["retrieved"])
        self.histograms["retrieval_prob"].add(r["retrieval_prob"])
        for cand in r["candidates"] or []:
            for score in SCORES:
                self.histograms[score].add(cand.get(score))
        for segment in r["segments"] or []:  # long-form: each kept segment's critique, its score as final
            for score in SCORES:
                self.histograms[score].add(segment.get("score" if score == "final" else score))
        if r["best_passage_id"] is not None and r["passages"]:
            ids = [p.get("id") for p in r["passages"]]
            if r["best_passage_id"] in ids:
                self.winning_rank[ids.index(r["best_passage_id"]) + 1] += 1
        if r["answer"] is not None:
            self.answer_words.add(len(r["answer"].split()))
        if r["path_depth"] is not None:
            self.long_form_depth[r["path_depth"]] += 1
            self.citations[len(r["citations"] or [])] += 1

    def overview(self) -> dict:
        """Counts for the report's header and for the run history."""
        decided = sum(c[1] for c in self.by_task.values())
        retrieved = sum(c[2] for c in self.by_task.values())
        return {"rows": self.rows, "errors": sum(self.errors.values()),
                "retrieval_rate": round(retrieved / decided, 4) if decided else None,
                "long_form_rows": sum(self.long_form_depth.values())}


def timeline(stages: dict) -> list[tuple[str, float, float, float | None]]:
    """The manifest's stage metrics as Gantt spans ``(name, start, end, busy)`` in seconds from
    the start of the run: each service's start-up (0 to ready), then each stage from its first
    batch to its last, busy for the seconds its batches took (summed over actors)."""
    spans = []
    for name, entry in stages.items():
        if not isinstance(entry, dict):
            continue
        if entry.get("ready_at") is not None:
            spans.append((f"{name} start-up", 0.0, float(entry["ready_at"]), None))
        if entry.get("first_start") is not None and entry.get("last_end") is not None:
            busy = entry.get("seconds")
            spans.append((name, float(entry["first_start"]), float(entry["last_end"]),
                          None if busy is None else float(busy)))
    return sorted(spans, key=lambda s: (s[1], s[2]))


def throughput(shards: list[dict], run_start: float) -> list[tuple[float, float]]:
    """Cumulative rows written against seconds since the start of the run, one point per shard."""
    points, total = [(0.0, 0.0)], 0
    for shard in sorted((s for s in shards if s.get("written_at")), key=lambda s: s["written_at"]):
        total += shard.get("rows") or 0
        points.append((round(max(shard["written_at"] - run_start, 0.0), 2), float(total)))
    return points if len(points) > 1 else []
