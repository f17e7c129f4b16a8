"""Index builds: corpus formats, chunked and trained builds (IVF-PQ, HNSW), and the Ray job."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from pipeline.infra.config import RetrievalConfig
from pipeline.retrieval.corpus import corpus_format, read_corpus
from pipeline.retrieval.index import Retriever, build_index_in_process, passage_texts, read_meta
from pipeline.infra.io import Storage

#: The storage of the local files these tests read.
LOCAL = Storage()
CORPUS = str(REPO / "data" / "demo" / "corpus.parquet")


def test_corpus_formats_read_the_same_passages(tmp_path):
    tsv = tmp_path / "psgs.tsv"
    tsv.write_text('id\ttext\ttitle\n1\t"Aaron is a ""prophet"", high priest."\tAaron\n2\tplain text\tB\n')
    jsonl = tmp_path / "psgs.jsonl"
    jsonl.write_text('{"id": 1, "title": "Aaron", "text": "Aaron is a \\"prophet\\", high priest."}\n'
                     '{"id": 2, "title": "B", "text": "plain text"}\n')
    parquet = tmp_path / "psgs.parquet"
    pq.write_table(pa.table({"id": ["1", "2"], "title": ["Aaron", "B"],
                             "text": ['Aaron is a "prophet", high priest.', "plain text"]}), parquet)
    tables = [read_corpus(LOCAL, str(p)) for p in (tsv, jsonl, parquet)]
    assert tables[0].to_pylist() == tables[1].to_pylist() == tables[2].to_pylist()
    assert tables[0].schema.names == ["id", "title", "text"] and tables[0].column("id").type == pa.string()
    with pytest.raises(ValueError, match="unknown format"):
        corpus_format("x.csv")


@pytest.mark.parametrize("factory, top1_at_least", [("Flat", 1.0), ("HNSW32", 0.95), ("IVF8,PQ16x4", 0.7),
                                                          ("IVF8,PQ16x4,RFlat", 0.95)])
def test_trained_and_chunked_builds_load_and_answer(tmp_path, factory, top1_at_least):
    # tiny chunks and a small training sample exercise buffering, training and chunked adds
    cfg = RetrievalConfig(corpus=CORPUS, index_dir=str(tmp_path / "idx"), factory=factory,
                          train_size=200, add_chunk_size=37, nprobe=4, ef_search=64)
    meta = build_index_in_process(cfg, LOCAL, cfg.index_dir)
    assert read_meta(LOCAL, cfg.index_dir) == meta
    assert (meta["factory"], meta["passages"], meta["dim"]) == (factory, 300, 384)
    retriever = Retriever(cfg, LOCAL)
    assert sum(shard.ntotal for shard in retriever.shards) == 300
    corpus = read_corpus(LOCAL, CORPUS)
    picks = list(range(0, 300, 7))
    results = retriever.search([passage_texts(corpus)[i] for i in picks], k=10)
    hits = sum(found[0]["id"] == corpus.column("id")[i].as_py() for i, found in zip(picks, results))
    assert all(len(found) == 10 for found in results)
    assert hits / len(picks) >= top1_at_least


def test_too_few_training_vectors_is_a_clear_error(tmp_path):
    cfg = RetrievalConfig(corpus=CORPUS, index_dir=str(tmp_path / "idx"), factory="IVF8,PQ16", train_size=100)
    with pytest.raises(ValueError, match=r"cannot train index 'IVF8,PQ16' on 100 vectors"):
        build_index_in_process(cfg, LOCAL, cfg.index_dir)


def test_build_index_job_on_ray(tmp_path):
    jsonl = tmp_path / "corpus.jsonl"
    rows = read_corpus(LOCAL, CORPUS).slice(0, 120).to_pylist()
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "idx"
    proc = subprocess.run([sys.executable, "-m", "jobs.build_index", f"retrieval.corpus={jsonl}",
                           f"retrieval.index_dir={out}", "retrieval.factory=HNSW16", "retrieval.add_chunk_size=50",
                           "stages.embed.batch_size=32", "ray.progress_bars=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(proc.stdout.strip().splitlines()[-1])
    assert meta["passages"] == 120 and meta["factory"] == "HNSW16" and len(meta["corpus_sha256"]) == 64
    assert sorted(p.name for p in out.iterdir()) == ["CURRENT", meta["version"]]  # a version, made current
    assert sorted(p.name for p in (out / meta["version"]).iterdir()) == ["index.faiss", "meta.json", "passages.arrow"]
    cfg = RetrievalConfig(corpus=str(jsonl), index_dir=str(out))
    store_ids = Retriever(cfg, LOCAL).store.fetch(list(range(120)))
    assert [p["id"] for p in store_ids] == [r["id"] for r in rows]  # corpus order kept
    found = Retriever(replace(cfg, factory="HNSW16"), LOCAL).search([passage_texts(read_corpus(LOCAL, str(jsonl)))[5]],
                                                                  k=3)
    assert found[0][0]["id"] == rows[5]["id"]


def test_build_index_job_refuses_a_missing_corpus(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.build_index", f"retrieval.corpus={tmp_path / 'none.parquet'}",
                           f"retrieval.index_dir={tmp_path / 'idx'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and f"error: corpus not found: {tmp_path / 'none.parquet'}" in proc.stderr
