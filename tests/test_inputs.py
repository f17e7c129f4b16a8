"""Input listing, locations and row ids on plain files (no Ray, no model)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.infra import io
from pipeline.infra.io import Storage
from pipeline.infra.config import InputConfig, load_config
from pipeline.run.preflight import scan_ids
from pipeline.stages.prepare import prepare_table

#: The storage of the local files these tests read.
LOCAL = Storage()


def write(path, table=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table if table is not None else pa.table({"instruction": ["Who?"]}), path)
    return str(path)


def test_metadata_files_are_not_shards_and_the_extension_is_case_insensitive(tmp_path):
    q = tmp_path / "q"
    for name in ["part-00000.parquet", "part-00001.PARQUET", "sub/part-00002.Parquet", ".part-00000.parquet.crc",
                 ".hidden.parquet", "_SUCCESS", "_common_metadata.parquet", "_temporary/0/part-9.parquet",
                 ".spark/part-8.parquet", "notes.txt"]:
        write(q / name)
    found = [s[len(str(q)) + 1:] for s in LOCAL.list_shards([str(q)])]
    assert found == ["part-00000.parquet", "part-00001.PARQUET", "sub/part-00002.Parquet"]
    # a glob leaves metadata out too (".hidden.parquet", "_common_metadata.parquet"), and directories
    assert [s[len(str(q)) + 1:] for s in LOCAL.list_shards([f"{q}/*.parquet"])] == ["part-00000.parquet"]
    assert "sub" not in [s[len(str(q)) + 1:] for s in LOCAL.list_shards([f"{q}/*"])]
    assert io.shard_stem(f"{q}/part-00001.PARQUET") == "part-00001"


def test_a_glob_with_a_character_class_is_taken_verbatim(tmp_path):
    q = tmp_path / "q"
    for i in range(3):
        write(q / f"part-0000{i}.parquet")
    cfg = load_config([], [f"input.paths={q}/part-0000[0-1].parquet"])
    assert cfg.input.paths == [f"{q}/part-0000[0-1].parquet"]
    assert [s.rsplit("/", 1)[1] for s in LOCAL.list_shards(cfg.input.paths)] == ["part-00000.parquet",
                                                                                "part-00001.parquet"]
    listed = load_config([], [f"input.paths=[{q}/part-0000[0-1].parquet, '{q}/part-00002.parquet']"]).input.paths
    assert listed == [f"{q}/part-0000[0-1].parquet", f"{q}/part-00002.parquet"]
    assert load_config([], ["output.path=out/${not_an_interpolation}"]).output.path == "out/${not_an_interpolation}"


def test_locations_resolve_every_spelling(tmp_path, monkeypatch):
    (tmp_path / "q").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "q")
    monkeypatch.chdir(tmp_path)
    for spelling in ["q", "q/", "./q", f"{tmp_path}/./q", f"{tmp_path}//q", "link", "q/sub/..", f"file://{tmp_path}/q"]:
        assert io.location(spelling) == str(tmp_path / "q"), spelling
    for spelling in ["s3://b/q", "s3://b/q/", "s3a://b/q", "s3://b//q", "s3://b/./q", "s3://b/x/../q"]:
        assert io.location(spelling) == "s3://b/q", spelling
    assert io.inside("s3://b/q/out", "s3://b/q") and not io.inside("s3://b/q2", "s3://b/q")
    assert LOCAL.input_location(write(tmp_path / "q" / "a.parquet")) == str(tmp_path / "q")
    assert LOCAL.input_location("s3://b/q/part-*.parquet") == "s3://b/q"


def test_null_ids_are_derived_and_duplicates_counted(tmp_path):
    a = write(tmp_path / "a.parquet", pa.table({"id": pa.array([1, 2, None, 2], pa.int64()), "instruction": ["q"] * 4}))
    b = write(tmp_path / "b.parquet", pa.table({"instruction": ["q"] * 2}))
    c = write(tmp_path / "c.parquet", pa.table({"id": ["b:1", "x"], "instruction": ["q"] * 2}))
    # a's null id becomes "a:2"; b has no id column ("b:0", "b:1"); "2" twice and "b:1" twice
    assert scan_ids(LOCAL, [a, b, c], "id") == {"null_derived": 1,
                                         "duplicates": {"rows": 2, "ids": 2, "examples": ["2", "b:1"]}}
    out = prepare_table(pq.read_table(a), a, InputConfig(), "m", "r").to_pylist()
    assert [r["id"] for r in out] == ["1", "2", "a:2", "2"]


@pytest.mark.parametrize("ids", [["x", "y"], [None, None]])
def test_ids_without_nulls_are_kept_as_they_are(tmp_path, ids):
    shard = write(tmp_path / "s.parquet", pa.table({"id": pa.array(ids, pa.string()), "instruction": ["q", "q"]}))
    out = prepare_table(pq.read_table(shard), shard, InputConfig(), "m", "r").to_pylist()
    assert [r["id"] for r in out] == [v if v is not None else f"s:{i}" for i, v in enumerate(ids)]
