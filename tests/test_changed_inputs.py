"""An input shard replaced under the same name is never taken for the one annotated: a resume
refuses done shards whose input changed, naming them and their markers, and discards rows
staged for the old content. No model runs: shards are committed and staged as the job's
writer does, from prepared rows."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.annotate import main
from pipeline.infra.io import Storage
from pipeline.output import staged_rows
from pipeline.infra.config import load_config
from pipeline.run.preflight import preflight
from pipeline.run.output import prepare_output
from pipeline.stages.prepare import prepare_table
from pipeline.stages.write import ShardWriter


def write_shard(path, questions: list[str]) -> str:
    pq.write_table(pa.table({"instruction": questions}), path)
    return str(path)


@pytest.fixture
def run(tmp_path):
    """Two input shards and the overrides of a run over them (never mode: no index needed)."""
    (tmp_path / "in").mkdir()
    a = write_shard(tmp_path / "in" / "a.parquet", ["Who wrote Hamlet?", "What is two plus two?"])
    b = write_shard(tmp_path / "in" / "b.parquet", ["Where is Paris?"])
    overrides = [f"input.paths={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", "selfrag.mode=never",
                 "output.report=false", "output.examples=0"]
    return a, b, overrides


def prepared(cfg, plan, shard: str) -> pa.Table:
    """A shard's rows as the prepare stage gives them to the model stages."""
    return prepare_table(plan.storage.read_table(shard), shard, cfg.input, cfg.engine.model, "r", plan.schema,
                         selfrag=cfg.selfrag)


def replace(shard: str, questions: list[str]) -> None:
    """Write other content under the same name, with a later modification time."""
    stat = os.stat(shard)
    write_shard(shard, questions)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_the_version_changes_with_the_content_and_not_without(run):
    a, _, _ = run
    storage = Storage()
    before = storage.file_version(a)
    assert storage.file_version(a) == before
    replace(a, ["Who painted the Mona Lisa?"])
    after = storage.file_version(a)
    assert after != before and after["size"] != before["size"]


def test_a_resume_over_a_replaced_done_shard_is_refused_naming_it(run, capsys):
    a, b, overrides = run
    cfg = load_config([], overrides)
    plan = preflight(cfg)
    writer = ShardWriter(cfg, plan.todo, plan.annotation_hash, plan.versions)
    for shard in plan.todo:  # both shards committed with their markers, as a finished run leaves them
        assert writer(prepared(cfg, plan, shard)).num_rows == 1
    marker_path = plan.output.marker(a)
    marker = json.loads(plan.output.read_text(marker_path))
    assert marker["input"] == plan.storage.file_version(a) and marker["annotation_hash"] == plan.annotation_hash

    assert main(overrides) == 0  # unchanged inputs: nothing to do, no refusal
    assert "0 shard(s) to annotate, 2 already done" in capsys.readouterr().out

    replace(a, ["Who painted the Mona Lisa?", "What is two plus two?"])
    output_before = pq.read_table(os.path.join(cfg.output.path, "a.parquet"))
    assert main(overrides) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    assert f"1 input shard(s) changed since {cfg.output.path} annotated them: {a} (size " in errors[0]
    assert marker_path in errors[0] and b not in errors[0]
    assert pq.read_table(os.path.join(cfg.output.path, "a.parquet")).equals(output_before)  # nothing touched

    os.remove(marker_path)  # what the message says to do: the shard is annotated again
    plan = preflight(cfg)
    assert list(plan.todo) == [a] and [d["shard"] for d in plan.done] == [b]


def test_rows_staged_for_a_replaced_shard_are_discarded(run, capsys):
    a, b, overrides = run
    cfg = load_config([], [*overrides, "output.flush_s=0.001"])  # the writer stages every batch it gets
    plan = preflight(cfg)
    writer = ShardWriter(cfg, plan.todo, plan.annotation_hash, plan.versions)
    assert writer(prepared(cfg, plan, a).slice(0, 1)).num_rows == 0  # one of a's two rows staged, the shard not committed
    prepare_output(cfg, plan)
    assert plan.staged == {a: 1, b: 0}  # the same input: a resume keeps the staged row

    replace(a, ["Who painted the Mona Lisa?", "What is two plus two?"])
    plan = preflight(cfg)
    prepare_output(cfg, plan)
    assert plan.staged == {a: 0, b: 0}
    assert f"input shard {a} changed since an earlier run staged its rows" in capsys.readouterr().out
    assert staged_rows.list_parts(plan.output, plan.annotation_hash, a) == {}


def test_staged_rows_without_a_recorded_version_are_discarded(run):
    a, _, overrides = run
    cfg = load_config([], overrides)
    plan = preflight(cfg)
    rows = prepared(cfg, plan, a)
    staged_rows.stage(rows, plan.output, plan.annotation_hash, a, stage_rows=8)
    assert staged_rows.discard_if_changed(plan.output, plan.annotation_hash, a, plan.versions[a])
    staged_rows.stage(rows, plan.output, plan.annotation_hash, a, stage_rows=8)
    staged_rows.record_version(plan.output, plan.annotation_hash, a, plan.versions[a])
    assert not staged_rows.discard_if_changed(plan.output, plan.annotation_hash, a, plan.versions[a])
    assert len(staged_rows.staged_offsets(plan.output, plan.annotation_hash, a)) == 2
