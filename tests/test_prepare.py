"""The prepare stage on plain tables: ids, prompts and per-row errors (no Ray needed)."""

import pyarrow as pa

from pipeline.infra.config import InputConfig
from pipeline.stages.columns import OFFSET, OUTPUT_TYPES, SHARD
from pipeline.stages.prepare import prepare_table


def test_ids_prompts_and_errors():
    table = pa.table({
        "instruction": ["Who founded Velmora?", None, " ", "Is it true?", "Q"],
        "input": [None, None, None, None, "extra"],
        "task": [None, None, None, "fever", "nope"],
        "keep": [1, 2, 3, 4, 5],
    })
    out = prepare_table(table, "s3://bucket/in/part-7.parquet", InputConfig(), "m", "r1").to_pylist()
    assert [r["id"] for r in out] == [f"part-7:{i}" for i in range(5)]
    assert out[0]["prompt"] == "### Instruction:\nWho founded Velmora?\n\n### Response:\n"
    assert out[0]["error"] is None and out[0]["keep"] == 1
    assert out[1]["error"] == "question is null" and out[1]["prompt"] is None
    assert out[2]["error"] == "question is empty"
    assert out[3]["prompt"].startswith("### Instruction:\nIs the following statement correct or not?")
    assert out[4]["error"].startswith("unknown task 'nope'")
    assert [r[OFFSET] for r in out] == list(range(5))
    assert {r[SHARD] for r in out} == {"s3://bucket/in/part-7.parquet"}
    assert all(r["model"] == "m" and r["run_id"] == "r1" for r in out)
    assert set(OUTPUT_TYPES) <= set(out[0])


def test_non_string_questions_are_row_errors_and_existing_ids_are_kept():
    table = pa.table({"id": [10, 11], "instruction": pa.array([7, None], pa.int64())})
    out = prepare_table(table, "x.parquet", InputConfig(), "m", "r").to_pylist()
    assert [r["id"] for r in out] == [10, 11]
    assert out[0]["error"] == "question is not a string (got int)"
    assert out[1]["error"] == "question is null"


def test_default_task_applies_to_rows_without_one():
    table = pa.table({"instruction": ["Claim."], "task": pa.array([None], pa.string())})
    out = prepare_table(table, "x.parquet", InputConfig(default_task="fever"), "m", "r").to_pylist()
    assert "Say true if it's correct" in out[0]["prompt"]


def test_prompts_follow_the_style_and_the_long_form_template():
    """asqa rows are decoded long-form by default, so they get the long-form script's template
    (no newline before the marker); with long form off, the short-form one; paper style joins
    with a blank line either way."""
    from pipeline.infra.config import LongFormConfig, SelfRagConfig
    from pipeline.selfrag.prompts import PAPER_INSTRUCTIONS, REFERENCE_INSTRUCTIONS

    table = pa.table({"instruction": ["Who?", "Claim."], "task": ["asqa", "fever"]})

    def prompts(**selfrag):
        return [r["prompt"] for r in prepare_table(table, "x.parquet", InputConfig(), "m", "r",
                                                   selfrag=SelfRagConfig(**selfrag)).to_pylist()]

    asqa, fever = REFERENCE_INSTRUCTIONS["asqa"], REFERENCE_INSTRUCTIONS["fever"]
    assert prompts() == [f"### Instruction:\n{asqa}## Input:\n\nWho?\n\n### Response:\n",
                         f"### Instruction:\n{fever}\n\n## Input:\n\nClaim.\n\n### Response:\n"]
    assert prompts(long_form=LongFormConfig(enabled=False))[0] == (
        f"### Instruction:\n{asqa}\n\n## Input:\n\nWho?\n\n### Response:\n")
    assert prompts(prompt_style="paper") == [
        f"### Instruction:\n{PAPER_INSTRUCTIONS['asqa']}\n\nWho?\n\n### Response:\n",
        f"### Instruction:\n{PAPER_INSTRUCTIONS['fever']}\n\nClaim.\n\n### Response:\n"]


def test_invalid_utf8_is_a_row_error_and_every_other_row_is_prepared():
    from pipeline.stages.prepare import repair_text

    raw = lambda values: pa.array(values, pa.binary()).view(pa.string())  # noqa: E731 - bytes as they are
    ctx = pa.StructArray.from_arrays([raw([b"ok", b"t\xff"])], ["text"])
    table = pa.table({"id": raw([b"a", b"b\xff", b"c"]), "instruction": raw([b"Who?", b"Wh\xffo?", None]),
                      "ctxs": pa.ListArray.from_arrays(pa.array([0, 1, 1, 2], pa.int32()), ctx)})
    repaired, errors = repair_text(table)
    assert errors == [None, "invalid UTF-8 in column 'id', 'instruction'", "invalid UTF-8 in column 'ctxs'"]
    assert repaired.column("id").to_pylist() == ["a", "b\ufffd", "c"]
    assert repaired.column("instruction").to_pylist() == ["Who?", "Wh\ufffdo?", None]
    assert repaired.column("ctxs").to_pylist() == [[{"text": "ok"}], [], None]
    rows = prepare_table(table, "s3://b/part-0.parquet", InputConfig(), "m", "r").to_pylist()
    assert [r["error"] for r in rows] == errors
    assert rows[0]["prompt"] is not None and rows[1]["prompt"] is None


def test_a_clean_table_is_returned_as_it_is():
    from pipeline.stages.prepare import repair_text

    table = pa.table({"instruction": ["Who?", None], "n": [1, 2]})
    repaired, errors = repair_text(table)
    assert repaired is table and errors == [None, None]
