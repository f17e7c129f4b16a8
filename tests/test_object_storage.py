"""s3:// in and out against a real S3 server on 127.0.0.1 (moto in server mode), resume after a
kill, and the safety refusals. Jobs run as subprocesses, as a user would run them."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from conftest import DEMO_QUERIES, REPO, RUN_MARK, marked_processes, wait_until_gone

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
SECRET = f"s3cr3t-{uuid.uuid4().hex}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free port; the AWS chain's environment variables point at fake keys
    (the secret is unique, so the tests can look for it in everything the job writes or prints)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.3)
    env = dict(os.environ, AWS_ACCESS_KEY_ID="AKIATESTKEY", AWS_SECRET_ACCESS_KEY=SECRET,
               AWS_DEFAULT_REGION="us-east-1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    fs = s3fs.S3FileSystem(key="AKIATESTKEY", secret=SECRET, client_kwargs={"endpoint_url": endpoint})
    for bucket in ("inputs", "outputs", "assets"):
        fs.mkdir(bucket)
    yield endpoint, env, fs
    proc.terminate()
    proc.wait(timeout=30)


def annotate(env, endpoint, tmp_path, *overrides, timeout=900) -> subprocess.CompletedProcess:
    """Run the job as a subprocess against the S3 server, in its own process group, which is
    killed when the job has exited; then wait until every process of the run is gone (Ray's
    workers leave the group: a job that died without cleanup leaves workers that may still be
    writing), so nothing the job started outlives the call."""
    cmd = [sys.executable, "-m", "jobs.annotate", f"storage.endpoint_url={endpoint}",
           f"storage.cache_dir={tmp_path / 'cache'}", "ray.progress_bars=false", "runner=ray", *overrides]
    mark = uuid.uuid4().hex
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(env, **{RUN_MARK: mark}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # nothing left in the group
            pass
        for p in marked_processes(mark):
            p.kill()
        wait_until_gone(mark)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def upload_shards(fs, prefix: str, shards: dict[str, pa.Table]) -> None:
    for name, table in shards.items():
        with fs.open(f"{prefix}/{name}", "wb") as f:
            pq.write_table(table, f)


def demo_rows() -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(DEMO_QUERIES.glob("*.parquet"))])


def output_rows(fs, prefix: str) -> list[dict]:
    fs.invalidate_cache()  # the job wrote with another client; drop this one's listings
    rows = []
    for path in sorted(fs.glob(f"{prefix}/*.parquet")):
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return rows


@pytest.mark.e2e
def test_s3_to_s3_with_model_and_index_in_s3(s3, tmp_path):
    endpoint, env, fs = s3
    demo = demo_rows()
    upload_shards(fs, "inputs/rt", {"part-a.parquet": demo.slice(0, 20), "part-b.parquet": demo.slice(20)})
    with fs.open("inputs/rt/broken.parquet", "wb") as f:
        f.write(b"this is not parquet")
    fs.put(str(REPO / "models" / "tiny-selfrag") + "/", "assets/models/tiny-selfrag/", recursive=True)

    proc = annotate(env, endpoint, tmp_path, "input.paths=s3://inputs/rt/", "output.path=s3://outputs/rt",
                    "engine.model=s3://assets/models/tiny-selfrag", "retrieval.index_dir=s3://assets/index/demo",
                    "output.on_bad_shard=skip")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    rows = output_rows(fs, "outputs/rt")
    assert sorted(r["id"] for r in rows) == sorted(demo.column("id").to_pylist())
    assert all(r["error"] is None for r in rows)
    # index hits: top 5; rows that bring ctxs use theirs
    assert any(r["retrieved"] for r in rows)
    assert all(len(r["passages"]) == (len(r["ctxs"]) if r["ctxs"] else 5) for r in rows if r["retrieved"])
    assert sorted(fs.ls("outputs/rt/_done")) == ["outputs/rt/_done/part-a.json", "outputs/rt/_done/part-b.json"]
    current = fs.cat("assets/index/demo/CURRENT").decode().strip()  # built on first run and stored in s3
    assert fs.exists(f"assets/index/demo/{current}/index.faiss")

    manifest = json.loads(fs.cat("outputs/rt/_manifest.json"))
    assert manifest["totals"]["rows_out"] == manifest["totals"]["rows_in"] == 40
    assert [b["shard"] for b in manifest["skipped_bad"]] == ["s3://inputs/rt/broken.parquet"]
    assert "cannot read Parquet shard s3://inputs/rt/broken.parquet" in manifest["skipped_bad"][0]["error"]
    assert manifest["packages"]["ray"] == "2.60.0" and manifest["annotation_hash"]

    # The secret appears in nothing the job wrote or printed.
    assert SECRET not in log
    for path in fs.find("outputs/rt"):
        assert SECRET.encode() not in fs.cat(path), path
    for path in (tmp_path / "cache").rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes()


def test_a_replaced_remote_directory_is_downloaded_again(s3, tmp_path, monkeypatch):
    """Storage.localize: one download per URL while the remote files stay the same; a file
    replaced at the same URL gives a fresh copy, never the stale one."""
    from pipeline.infra.config import StorageConfig
    from pipeline.infra.io import Storage

    endpoint, env, fs = s3
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, env[key])
    storage = Storage(StorageConfig(endpoint_url=endpoint, cache_dir=str(tmp_path / "cache")))
    fs.pipe({"assets/swap/config.json": b'{"v": 1}', "assets/swap/weights.bin": b"1111"})
    first = storage.localize("s3://assets/swap")
    assert storage.localize("s3://assets/swap") == first
    assert Path(first, "config.json").read_bytes() == b'{"v": 1}'
    fs.pipe("assets/swap/config.json", b'{"v": 22}')
    fs.invalidate_cache()
    second = storage.localize("s3://assets/swap")
    assert second != first and Path(second, "config.json").read_bytes() == b'{"v": 22}'
    assert Path(second, "weights.bin").read_bytes() == b"1111"


def test_an_s3_shard_version_is_its_content_digest(s3, tmp_path, monkeypatch):
    """Storage.file_version on S3: the same bytes uploaded again keep the version (the ETag is
    their MD5), other bytes under the same key change it, so a resume tells a replaced shard."""
    from pipeline.infra.config import StorageConfig
    from pipeline.infra.io import Storage

    endpoint, env, fs = s3
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, env[key])
    storage = Storage(StorageConfig(endpoint_url=endpoint))
    fs.pipe("inputs/versions/q.parquet", b"first content")
    first = storage.file_version("s3://inputs/versions/q.parquet")
    assert first == {"size": 13, "stamp": hashlib.md5(b"first content").hexdigest()}
    fs.pipe("inputs/versions/q.parquet", b"first content")
    assert storage.file_version("s3://inputs/versions/q.parquet") == first
    fs.pipe("inputs/versions/q.parquet", b"other content")
    storage.filesystem("s3://inputs")[0].invalidate_cache()
    assert storage.file_version("s3://inputs/versions/q.parquet")["stamp"] != first["stamp"]


def test_a_killed_run_resumes_and_a_rerun_does_no_model_work(s3, tmp_path, simulated_engine):
    """With the simulated engine (a real run's recorded answers): the resume is about the
    bookkeeping in the bucket, not the model."""
    endpoint, env, fs = s3
    demo = demo_rows()
    shards = {f"part-{i}.parquet": demo.slice(5 * i, 5) for i in range(8)}
    upload_shards(fs, "inputs/resume", shards)
    common = ["input.paths=s3://inputs/resume/", "output.path=s3://outputs/resume", "selfrag.mode=never",
              "stages.chain.batch_size=2", f"retrieval.index_dir={tmp_path / 'index'}", *simulated_engine]

    killed = annotate(env, endpoint, tmp_path, *common, "debug.exit_after_shards=1")
    assert killed.returncode == 3, (killed.stdout + killed.stderr)[-4000:]
    # what the next run will find (every process of the killed run is gone)
    fs.invalidate_cache()  # (a marker being written when the run was killed is a hidden temporary)
    done_after_kill = [p for p in fs.ls("outputs/resume/_done") if not p.rsplit("/", 1)[1].startswith(".")]
    assert 1 <= len(done_after_kill) < 8
    for path in fs.glob("outputs/resume/*.parquet"):  # whatever a reader would pick up is complete
        name = path.rsplit("/", 1)[1]
        with fs.open(path, "rb") as f:
            assert pq.read_table(f).num_rows == shards[name].num_rows

    resumed = annotate(env, endpoint, tmp_path, *common)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    rows = output_rows(fs, "outputs/resume")
    assert sorted(r["id"] for r in rows) == sorted(demo.column("id").to_pylist())
    manifest = json.loads(fs.cat("outputs/resume/_manifest.json"))
    assert len(manifest["skipped_done"]) == len(done_after_kill)
    assert manifest["this_run"]["shards"] == 8 - len(done_after_kill)
    assert manifest["totals"] == {"shards": 8, "rows_in": 40, "rows_out": 40, "errors": 0, "retrieved": 0}

    again = annotate(env, endpoint, tmp_path, *common)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "0 shard(s) to annotate, 8 already done" in again.stdout
    # the runs' logs went to the output (the console stays quiet); the last one deployed no engine
    # (Serve's lines name its deployment), and no log holds the secret key of the environment
    logs = sorted(fs.glob("outputs/resume/_logs/run-*.log"))
    assert len(logs) == 2, logs  # the killed run never got to copy its log
    texts = [fs.cat(p).decode() for p in logs]
    assert "name='SelfRagEngine'" in texts[0] and "SelfRagEngine" not in texts[1]
    assert "CALL generate" not in texts[0] and "CALL search" not in texts[0]  # no access-log line per service call
    assert not any(SECRET in t for t in texts)
    assert "SelfRagEngine" not in again.stdout + again.stderr
    # each run's report went to the bucket too, and the history has the runs that reported
    assert "<svg class=\"plot\"" in fs.cat("outputs/resume/report.html").decode()
    assert len(json.loads(fs.cat("outputs/resume/_history.json"))) == 2
    manifest = json.loads(fs.cat("outputs/resume/_manifest.json"))
    assert manifest["this_run"]["shards"] == 0 and manifest["stages"] == {}
    assert len(manifest["skipped_done"]) == 8


def test_missing_bucket_is_refused_naming_it(s3, tmp_path):
    endpoint, env, fs = s3
    upload_shards(fs, "inputs/one", {"q.parquet": demo_rows().slice(0, 2)})
    proc = annotate(env, endpoint, tmp_path, "input.paths=s3://inputs/one/", "output.path=s3://no-such-bucket/out",
                    timeout=120)
    assert proc.returncode == 2
    assert "error: cannot write to output location s3://no-such-bucket/out" in proc.stderr
    assert "bucket does not exist: s3://no-such-bucket" in proc.stderr
    assert not fs.exists("no-such-bucket")  # never created
    missing_in = annotate(env, endpoint, tmp_path, "input.paths=s3://nothing-here/q/", "output.path=s3://outputs/x",
                          timeout=120)
    assert missing_in.returncode == 2 and "input path does not exist: s3://nothing-here/q/" in missing_in.stderr
    assert SECRET not in proc.stdout + proc.stderr + missing_in.stdout + missing_in.stderr


S3_SPELLINGS = [
    ("s3://inputs/sp/", "s3://inputs/./sp", "is"),
    ("s3://inputs/sp/part-00000.parquet", "s3://inputs/sp", "is"),  # a file input: its directory
    ("s3://inputs/sp/part-0000[0-1].parquet", "s3://inputs/sp/", "is"),
    ("s3a://inputs/sp", "s3://inputs//sp/annotated", "is inside"),
    ("s3://inputs/sp", "s3://inputs/x/../sp", "is"),
    ("s3://inputs/sp", "s3://inputs", "contains"),
]


@pytest.mark.parametrize("given, output, relation", S3_SPELLINGS)
def test_an_s3_output_at_an_input_location_is_refused_in_every_spelling(s3, tmp_path, monkeypatch, capsys,
                                                                        given, output, relation):
    from jobs.annotate import main

    endpoint, env, fs = s3
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, env[key])
    upload_shards(fs, "inputs/sp", {"part-00000.parquet": demo_rows().slice(0, 2)})
    before = fs.cat("inputs/sp/part-00000.parquet")
    code = main([f"storage.endpoint_url={endpoint}", f"input.paths={given}", f"output.path={output}",
                 "selfrag.mode=never", f"storage.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: output.path {output} {relation} the input location {given} (s3://inputs/sp)" in err
    fs.invalidate_cache()
    assert fs.cat("inputs/sp/part-00000.parquet") == before
    assert not [p for p in fs.find("inputs") if p.rsplit("/", 1)[1].startswith("_")]  # no _config.yaml, no marker


def test_unreachable_endpoint_is_one_clear_error(s3, tmp_path):
    _, env, _ = s3
    dead = f"http://127.0.0.1:{free_port()}"
    proc = annotate(env, dead, tmp_path, "input.paths=s3://inputs/one/", "output.path=s3://outputs/x",
                    "storage.s3_options.config_kwargs.retries.max_attempts=1", timeout=300)
    assert proc.returncode == 2
    assert "error: cannot list input path s3://inputs/one/" in proc.stderr
    assert "Traceback" not in proc.stderr and SECRET not in proc.stdout + proc.stderr


def test_index_build_job_round_trip_through_s3(s3, tmp_path):
    endpoint, env, fs = s3
    from pipeline.infra.config import RetrievalConfig, StorageConfig
    from pipeline.infra.io import Storage
    from pipeline.retrieval.corpus import read_corpus
    from pipeline.retrieval.index import Retriever, passage_texts

    rows = read_corpus(Storage(), str(REPO / "data" / "demo" / "corpus.parquet")).slice(0, 60).to_pylist()
    fs.pipe("assets/corpus/psgs.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    cmd = [sys.executable, "-m", "jobs.build_index", f"storage.endpoint_url={endpoint}",
           "retrieval.corpus=s3://assets/corpus/psgs.jsonl", "retrieval.index_dir=s3://assets/index/built",
           "ray.progress_bars=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fs.invalidate_cache()
    version = json.loads(proc.stdout.strip().splitlines()[-1])["version"]
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("assets/index/built")) == ["CURRENT", version]
    assert fs.cat("assets/index/built/CURRENT").decode().strip() == version
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"assets/index/built/{version}")) == [
        "index.faiss", "meta.json", "passages.arrow"]

    # load it back through the local cache, with storage options of this process's own
    old = dict(os.environ)
    os.environ.update(AWS_ACCESS_KEY_ID="AKIATESTKEY", AWS_SECRET_ACCESS_KEY=SECRET)
    try:
        storage = Storage(StorageConfig(endpoint_url=endpoint, cache_dir=str(tmp_path / "cache")))
        retriever = Retriever(RetrievalConfig(index_dir="s3://assets/index/built"), storage)
        corpus = read_corpus(storage, str(REPO / "data" / "demo" / "corpus.parquet"))
        found = retriever.search([passage_texts(corpus)[7]], k=3)
        assert found[0][0]["id"] == rows[7]["id"]
    finally:
        os.environ.clear()
        os.environ.update(old)
