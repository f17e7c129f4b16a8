"""The writer on plain tables (no Ray): bounded memory through staged parts, commits in input
order, rows sent twice counted once, and a restarted writer or a resume losing no staged row."""

from __future__ import annotations

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.output import staged_rows
from pipeline.infra.config import load_config
from pipeline.infra.io import Storage
from pipeline.output.folder import OutputFolder
from pipeline.stages.columns import OFFSET
from pipeline.stages.prepare import prepare_table
from pipeline.stages.write import ShardWriter, commit_shard

HASH = "abc123"
SHARD = "/in/part-0.parquet"


def writer(tmp_path, n: int, buffer_rows: int = 10, stage_rows: int = 8, flush_s: float = 3600.0) -> ShardWriter:
    cfg = load_config([], [f"output.path={tmp_path / 'out'}", f"output.buffer_rows={buffer_rows}",
                           f"output.stage_rows={stage_rows}", f"output.flush_s={flush_s}"])
    return ShardWriter(cfg, {SHARD: n}, HASH)


def rows(n: int) -> pa.Table:
    """A shard's prepared rows, with the answer a first pass would give."""
    from pipeline.infra.config import InputConfig

    table = prepare_table(pa.table({"instruction": [f"Question {i}?" for i in range(n)]}), SHARD, InputConfig(),
                          "m", "r")
    return table.set_column(table.column_names.index("answer"), "answer",
                            pa.array([f"answer {i}" for i in range(n)]))


def batches(table: pa.Table, size: int, seed: int = 0) -> list[pa.Table]:
    """The table in shuffled batches (rows reach the writer out of order)."""
    order = list(range(table.num_rows))
    random.Random(seed).shuffle(order)
    return [table.take(order[i:i + size]) for i in range(0, len(order), size)]


def folder(tmp_path) -> OutputFolder:
    """The writer's output location, ``tmp_path / "out"``."""
    return OutputFolder(str(tmp_path / "out"), Storage())


def visible(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "out").glob("*.parquet"))


def test_a_shard_is_staged_in_bounded_memory_and_committed_whole_in_input_order(tmp_path):
    table, w = rows(50), writer(tmp_path, 50)
    parts = batches(table, 7)
    summaries = []
    for i, batch in enumerate(parts):
        summaries += w(batch).to_pylist()
        assert w.held <= 10  # never more than buffer_rows in memory
        if i < len(parts) - 1:
            assert visible(tmp_path) == [] and summaries == []  # nothing exposed before the shard is whole
    staged_before_commit = staged_rows.list_parts(folder(tmp_path), HASH, SHARD)
    assert summaries and summaries[0]["rows"] == 50 and summaries[0]["errors"] == 0
    out = pq.read_table(tmp_path / "out" / "part-0.parquet")
    assert out.column("answer").to_pylist() == [f"answer {i}" for i in range(50)]
    assert OFFSET not in out.column_names
    assert json.loads((tmp_path / "out" / "_done" / "part-0.json").read_text())["annotation_hash"] == HASH
    assert staged_before_commit == {}  # the staged parts went with the commit
    assert not (tmp_path / "out" / "_staging" / HASH / "part-0").exists()


def test_rows_are_staged_by_bucket_once_the_buffer_is_full(tmp_path):
    table, w = rows(40), writer(tmp_path, 40, buffer_rows=10, stage_rows=8)
    for batch in batches(table, 6)[:4]:  # 24 of 40 rows
        w(batch)
    parts = staged_rows.list_parts(folder(tmp_path), HASH, SHARD)
    assert parts and set(parts) <= {0, 1, 2, 3, 4}
    staged = staged_rows.staged_offsets(folder(tmp_path), HASH, SHARD)
    assert len(staged) + w.held == 24 and w.held <= 10
    for bucket, paths in parts.items():  # a part holds rows of its bucket only
        for p in paths:
            offsets = pq.read_table(p).column(OFFSET).to_pylist()
            assert {o // 8 for o in offsets} == {bucket}


def test_rows_sent_twice_count_once(tmp_path):
    table, w = rows(20), writer(tmp_path, 20, buffer_rows=4)
    parts = batches(table, 5)
    out = []
    for batch in parts[:2] + parts[:2] + parts[2:]:  # a retried task sends its rows again
        out += w(batch).to_pylist()
    assert [s["rows"] for s in out] == [20]
    assert pq.read_table(tmp_path / "out" / "part-0.parquet").column("answer").to_pylist() \
        == [f"answer {i}" for i in range(20)]
    assert w(parts[0]).num_rows == 0  # rows of a committed shard are ignored


def test_a_restarted_writer_keeps_what_was_staged_and_a_resume_adds_only_the_rest(tmp_path):
    table = rows(30)
    parts = batches(table, 5)
    first = writer(tmp_path, 30, buffer_rows=4, stage_rows=8)
    for batch in parts[:4]:  # 20 rows: at least 16 staged, up to 4 held in memory
        first(batch)
    staged = set(staged_rows.staged_offsets(folder(tmp_path), HASH, SHARD).tolist())
    assert len(staged) >= 16
    del first  # the writer dies: what it held is lost, nothing is exposed
    assert visible(tmp_path) == []

    second = writer(tmp_path, 30, buffer_rows=4, stage_rows=8)  # the resume sends only unstaged rows
    rest = table.filter(pa.array([o not in staged for o in table.column(OFFSET).to_pylist()]))
    out = []
    for batch in batches(rest, 4, seed=1):
        out += second(batch).to_pylist()
    assert [s["rows"] for s in out] == [30]
    assert pq.read_table(tmp_path / "out" / "part-0.parquet").column("answer").to_pylist() \
        == [f"answer {i}" for i in range(30)]


def killed_run_with_20_row_buckets(tmp_path, table: pa.Table, legacy_names: bool = False) -> set[int]:
    """A run with ``stage_rows=20`` that staged offsets 0-17 and 28-59 and was killed (what it
    held is lost); ``legacy_names``: its parts named as before names recorded their width.
    Returns the offsets it staged."""
    first = writer(tmp_path, table.num_rows, stage_rows=20, flush_s=1e-9)  # stages every batch it gets
    staged = set(range(18)) | set(range(28, 60))
    for batch in batches(table.filter(pa.array([o in staged for o in range(table.num_rows)])), 5):
        assert first(batch).num_rows == 0
    del first
    assert set(staged_rows.staged_offsets(folder(tmp_path), HASH, SHARD).tolist()) == staged
    if legacy_names:
        for paths in staged_rows.list_parts(folder(tmp_path), HASH, SHARD).values():
            for path in paths:
                name = path.rsplit("/", 1)[-1]
                bucket, width, suffix = name.split("-")
                assert width == "w20"
                (tmp_path / "out" / "_staging" / HASH / "part-0" / name).rename(
                    tmp_path / "out" / "_staging" / HASH / "part-0" / f"{bucket}-{suffix}")
    return staged


@pytest.mark.parametrize("legacy_names", [False, True])
def test_a_resume_with_another_stage_rows_commits_in_input_order(tmp_path, legacy_names):
    """Killed with ``stage_rows=20``, resumed with ``stage_rows=7``: bucket numbers of the two runs
    mean other offsets (bucket 2 is 40-59 for one, 14-20 for the other), yet every row is
    committed once, in input order (it was ``0-17, 28-39, 18-20, 40-59, 21-27``)."""
    table = rows(60)
    staged = killed_run_with_20_row_buckets(tmp_path, table, legacy_names)
    second = writer(tmp_path, 60, buffer_rows=4, stage_rows=7)  # the resume sends only unstaged rows
    rest = table.filter(pa.array([o not in staged for o in range(60)]))
    out = []
    for batch in batches(rest, 3, seed=2):
        out += second(batch).to_pylist()
    assert [s["rows"] for s in out] == [60]
    assert pq.read_table(tmp_path / "out" / "part-0.parquet").column("answer").to_pylist() \
        == [f"answer {i}" for i in range(60)]
    assert not (tmp_path / "out" / "_staging" / HASH / "part-0").exists()


def test_parts_staged_with_another_stage_rows_are_recut_once(tmp_path):
    output = folder(tmp_path)
    table = rows(30)
    staged_rows.stage(table.slice(0, 10), output, HASH, SHARD, stage_rows=20)  # bucket 0 of 20: offsets 0-9
    staged_rows.stage(table.slice(10, 10), output, HASH, SHARD, stage_rows=5)  # buckets 2, 3 of 5
    assert staged_rows.rebucket(output, HASH, SHARD, 5) == 1  # only the 20-row part
    parts = staged_rows.list_parts(output, HASH, SHARD)
    assert sorted(parts) == [0, 1, 2, 3]
    assert all(staged_rows.part_width(p) == 5 for paths in parts.values() for p in paths)
    assert staged_rows.rebucket(output, HASH, SHARD, 5) == 0
    assert sorted(staged_rows.staged_offsets(output, HASH, SHARD).tolist()) == list(range(20))
    # a part named before names recorded their width is re-cut only if its rows leave its bucket
    staged_rows.remove_shard(output, HASH, SHARD)
    staged_rows.stage(table.slice(0, 5), output, HASH, SHARD, stage_rows=20)
    [[path]] = staged_rows.list_parts(output, HASH, SHARD).values()
    legacy = path.replace("-w20-", "-")
    os.rename(path, legacy)
    assert staged_rows.part_width(legacy) is None
    assert staged_rows.rebucket(output, HASH, SHARD, 5) == 0  # offsets 0-4: bucket 0 of 5 too
    assert staged_rows.rebucket(output, HASH, SHARD, 3) == 1


def test_a_real_resume_with_another_stage_rows_commits_in_input_order(tmp_path, capsys):
    """Through ``jobs.annotate.main``: an earlier run staged every row of a shard, some with
    ``stage_rows=20`` and the rest with ``stage_rows=7``; the resume (``stage_rows=7``) commits it
    without a model, in input order, and its marker records the annotation identity."""
    from jobs.annotate import main
    from pipeline.run.preflight import preflight

    (tmp_path / "in").mkdir()
    shard = str(tmp_path / "in" / "part-0.parquet")
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(60)],
                             "instruction": [f"Question {i}?" for i in range(60)]}), shard)
    overrides = [f"input.paths={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", "selfrag.mode=never",
                 "output.report=false", "output.examples=0", "output.stage_rows=7"]
    cfg = load_config([], overrides)
    plan = preflight(cfg)
    table = prepare_table(plan.storage.read_table(shard), shard, cfg.input, cfg.engine.model, "r", plan.schema,
                          selfrag=cfg.selfrag)
    first = [o for o in range(60) if o < 18 or o >= 28]
    staged_rows.record_version(plan.output, plan.annotation_hash, shard, plan.versions[shard])
    staged_rows.stage(table.take(first), plan.output, plan.annotation_hash, shard, stage_rows=20)
    staged_rows.stage(table.slice(18, 10), plan.output, plan.annotation_hash, shard, stage_rows=7)

    assert main(overrides) == 0
    assert "60 row(s) staged by an earlier run are kept" in capsys.readouterr().out
    assert pq.read_table(tmp_path / "out" / "part-0.parquet").column("id").to_pylist() == [f"q{i}" for i in range(60)]
    marker = json.loads(plan.output.read_text(plan.output.marker(shard)))
    assert plan.output.marker(shard) == str(tmp_path / "out" / "_done" / "part-0.json")
    assert marker["annotation_identity"] == json.loads(json.dumps(plan.identity))


def test_an_incomplete_commit_exposes_nothing(tmp_path):
    output = folder(tmp_path)
    staged_rows.stage(rows(10).slice(0, 6), output, HASH, SHARD, stage_rows=4)
    with pytest.raises(RuntimeError, match="6 rows staged, 10 expected"):
        commit_shard(output, HASH, SHARD, 10, stage_rows=4)
    assert visible(tmp_path) == [] and not (tmp_path / "out" / "_done").exists()
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_staged_rows_of_another_identity_are_removed(tmp_path):
    output = folder(tmp_path)
    staged_rows.stage(rows(4), output, "other", SHARD, stage_rows=4)
    staged_rows.stage(rows(4), output, HASH, SHARD, stage_rows=4)
    assert staged_rows.remove_other_identities(output, HASH) == ["other"]
    assert len(staged_rows.staged_offsets(output, HASH, SHARD)) == 4
    assert staged_rows.remove_other_identities(output, None) == [HASH]


def test_temporaries_of_interrupted_writes_are_removed_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    (out / "_done").mkdir(parents=True)
    for name in (".part-0.parquet.0123abcd.tmp", "part-1.parquet", ".keep", "_config.yaml",
                 "_done/.part-1.json.0123abcd.tmp", "_done/part-0.json"):
        (out / name).write_text("x")
    assert OutputFolder(str(out), Storage()).remove_temporaries() == 2
    assert sorted(p.name for p in out.iterdir()) == [".keep", "_config.yaml", "_done", "part-1.parquet"]
    assert [p.name for p in (out / "_done").iterdir()] == ["part-0.json"]
    assert Storage().remove_temporaries(str(tmp_path / "missing")) == 0
