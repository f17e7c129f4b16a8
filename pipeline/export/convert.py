"""One shard of an annotated run converted, filtered and split (pure: a table in, records and
counts out). The export job runs it twice per shard: once for the duplicate keys, once to write."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from .config import ExportConfig
from .filters import dedupe_key, drop_reason, forced_no_retrieval, split_of
from .records import Scrub, chat_record, critic_records, generator_record, instruction_and_input

KINDS = ("generator", "critic", "chat")


@dataclass
class ShardResult:
    """Records by kind and split, filter counts, label counts and (offset, key) of kept rows."""

    records: dict = field(default_factory=lambda: {k: {"train": [], "validation": []} for k in KINDS})
    counts: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    keys: list = field(default_factory=list)


def row_id(row: dict, columns: dict, stem: str, offset: int) -> str:
    """The row's id (the run's id column; ``"<stem>:<offset>"`` when it has none)."""
    value = row.get(columns["id"])
    return f"{stem}:{offset}" if value is None else str(value)


def convert_rows(rows: list[dict], stem: str, columns: dict, cfg: ExportConfig,
                 duplicates: set[int] | frozenset = frozenset(), ids: dict[str, int] | None = None,
                 keys_only: bool = False) -> ShardResult:
    """Apply the row-local filters, drop the offsets in ``duplicates`` (later copies found by the
    global pass), and convert the rest; every dropped row is counted under its filter, and every
    exported record whose text had control strings stripped under ``scrubbed_{kind}``.
    ``keys_only``: only the kept rows' duplicate keys (the first pass)."""
    out = ShardResult()
    skip_never = cfg.never_mode_rows == "skip"
    for offset, row in enumerate(rows):
        out.counts["rows_in"] += 1
        if forced_no_retrieval(row):
            out.counts["never_mode_rows"] += 1
        reason = drop_reason(row, row.get(columns["question"]), cfg.filters, skip_never)
        rid = row_id(row, columns, stem, offset)
        scrubs = {kind: Scrub() for kind in KINDS}
        gen = None if reason else generator_record(row, columns, rid, scrubs["generator"])
        if reason is None and gen is None:
            reason = "no_output"
        if reason is None and offset in duplicates:
            reason = "duplicates"
        if reason is not None:
            out.counts[f"dropped_{reason}"] += 1
            continue
        instruction, input_text = instruction_and_input(row, columns)
        out.keys.append((offset, dedupe_key(instruction, input_text, row["answer"])))
        if keys_only:
            continue
        split = split_of(rid, cfg.validation_fraction)
        out.counts["rows_out"] += 1
        out.counts[f"rows_{split}"] += 1
        if forced_no_retrieval(row):
            out.counts["never_mode_rows_exported"] += 1
        out.records["generator"][split].append(gen)
        out.labels["generator:" + ("retrieval" if gen["output"].startswith("[Retrieval]") else "no_retrieval")] += 1
        for rec in critic_records(row, columns, rid, ids, scrubs["critic"]):
            out.records["critic"][split].append(rec)
            out.labels[f"{rec['aspect']}:{rec['label']}"] += 1
        out.records["chat"][split].append(chat_record(row, columns, rid, scrubs["chat"]))
        for kind, scrub in scrubs.items():
            if scrub.records:
                out.counts[f"scrubbed_{kind}"] += scrub.records
    return out


def convert_table(table: pa.Table, stem: str, columns: dict, cfg: ExportConfig,
                  duplicates: set[int] | frozenset = frozenset(), ids: dict[str, int] | None = None,
                  keys_only: bool = False) -> ShardResult:
    """``convert_rows`` on a shard's table."""
    return convert_rows(table.to_pylist(), stem, columns, cfg, duplicates, ids, keys_only)


def find_duplicates(keys_by_shard: dict[str, list[tuple[int, str]]]) -> dict[str, set[int]]:
    """Per shard, the offsets of rows whose key an earlier row has (shards in name order, rows
    in offset order): the global step of duplicate removal."""
    seen, dropped = set(), {}
    for stem in sorted(keys_by_shard):
        for offset, key in sorted(keys_by_shard[stem]):
            if key in seen:
                dropped.setdefault(stem, set()).add(offset)
            else:
                seen.add(key)
    return dropped
