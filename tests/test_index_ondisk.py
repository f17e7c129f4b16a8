"""IVF indexes built in pieces into on-disk lists, sharded, and re-ranked by the float16 refine
store: the merged top-k of shards equals one index's, refinement recovers exact search, and a
shard searched in a Serve deployment of its own answers as the shard in the replica does."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.infra.config import RetrievalConfig
from pipeline.retrieval.index import IndexBuilder, Retriever, index_exists
from pipeline.retrieval.search import RefineStore, merge_topk
from pipeline.infra.io import Storage

#: The storage of the local files these tests read.
LOCAL = Storage()
DIM = 384  # the packaged encoder's dimension: Retriever checks the index against it


def test_merge_topk_orders_by_score_then_row_and_pads_missing_hits():
    shard_a = (np.array([[0.9, 0.5], [0.2, 0.0]]), np.array([[4, 7], [1, -1]]))
    shard_b = (np.array([[0.7, 0.5], [0.3, 0.1]]), np.array([[2, 3], [6, 8]]))
    scores, rows = merge_topk([shard_a, shard_b], 3)
    assert rows.tolist() == [[4, 2, 3], [6, 1, 8]]  # 0.5 tie: row 3 before row 7; row -1 never counts
    assert np.allclose(scores, [[0.9, 0.7, 0.5], [0.3, 0.2, 0.1]])
    scores, rows = merge_topk([shard_a], 3)
    assert rows.tolist() == [[4, 7, -1], [1, -1, -1]] and np.isneginf(scores[1, 1:]).all()


def test_refine_store_reranks_candidates_by_exact_inner_product(tmp_path):
    path = tmp_path / "vectors.f16"
    path.write_bytes(np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float16).tobytes())
    store = RefineStore(path, 3, 2)
    # query (2, 1): inner products 2, 1, 3
    scores, rows = store.rerank(np.array([[2.0, 1.0]]), np.array([[0, 1, 2, -1]]), 2)
    assert rows.tolist() == [[2, 0]] and scores.tolist() == [[3.0, 2.0]]
    with pytest.raises(ValueError, match=r"not 4 x 2 float16"):
        RefineStore(path, 4, 2)


def clustered(n: int, seed: int = 0, centers: int = 40) -> np.ndarray:
    """Vectors around random centres (the structure IVF relies on), unit length."""
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centers, DIM)).astype(np.float32)
    v = middle[rng.integers(0, centers, n)] + 0.35 * rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def build(out: Path, vectors: np.ndarray, chunk: int = 500, **settings) -> dict:
    cfg = RetrievalConfig(index_dir=str(out), **settings)
    builder = IndexBuilder(cfg, DIM, str(out))
    for start in range(0, len(vectors), chunk):
        part = vectors[start:start + chunk]
        ids = [f"p{i}" for i in range(start, start + len(part))]
        builder.add(pa.table({"id": ids, "title": ids, "text": ids}), part)
    return builder.close()


IVF = dict(factory="IVF16,PQ16", train_size=1200, nprobe=4, add_chunk_size=300)


@pytest.fixture(scope="module")
def corpus():
    """3,000 passage vectors, and 40 queries from the same distribution."""
    vectors = clustered(3040)
    return vectors[:3000], vectors[3000:]


def test_two_shards_built_in_pieces_give_one_index_top_k(tmp_path, corpus):
    vectors, queries = corpus
    one = build(tmp_path / "one", vectors, **IVF)
    two = build(tmp_path / "two", vectors, shards=2, build_piece_size=700, **IVF)  # 5 pieces per shard
    assert one["shards"] == ["index.faiss"] and one["index_files"] == ["index.faiss", "index.ivfdata"]
    assert two["shards"] == ["index-0-of-2.faiss", "index-1-of-2.faiss"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        [*two["index_files"], "meta.json", "passages.arrow"])  # no piece file is left
    a = Retriever(RetrievalConfig(index_dir=str(tmp_path / "one"), **IVF), LOCAL)
    b = Retriever(RetrievalConfig(index_dir=str(tmp_path / "two"), **IVF), LOCAL)
    sizes = [shard.ntotal for shard in b.shards]
    assert sum(sizes) == 3000 and min(sizes) > 1000  # lists dealt out between the shards
    scores_a, rows_a = a.search_vectors(queries, 10)
    scores_b, rows_b = b.search_vectors(queries, 10)
    assert (rows_a == rows_b).all() and np.allclose(scores_a, scores_b, atol=1e-5)

    # a version is self-contained: moved elsewhere, its on-disk lists are found beside it
    moved = tmp_path / "elsewhere" / "v"
    shutil.move(str(tmp_path / "two"), moved)
    assert index_exists(LOCAL, str(moved))
    moved_retriever = Retriever(RetrievalConfig(index_dir=str(moved), **IVF), LOCAL)
    assert (moved_retriever.search_vectors(queries, 10)[1] == rows_a).all()
    os.unlink(moved / "index-1-of-2.ivfdata")
    assert not index_exists(LOCAL, str(moved))  # a version missing a file its metadata names is incomplete


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def test_float16_refine_recovers_exact_search(tmp_path, corpus):
    vectors, queries = corpus
    settings = dict(IVF, factory="IVF16,PQ8", nprobe=16)  # coarse codes: alone they miss many hits
    build(tmp_path / "pq", vectors, **settings)
    meta = build(tmp_path / "refined", vectors, refine="float16", k_factor=8, **settings)
    assert meta["refine"] == "float16" and "vectors.f16" in meta["index_files"]
    assert (tmp_path / "refined" / "vectors.f16").stat().st_size == 3000 * DIM * 2
    truth = exact_top(vectors, queries, 10)
    plain = Retriever(RetrievalConfig(index_dir=str(tmp_path / "pq"), **settings), LOCAL).search_vectors(queries, 10)
    refined = Retriever(RetrievalConfig(index_dir=str(tmp_path / "refined"), refine="float16", k_factor=8,
                                        **settings), LOCAL).search_vectors(queries, 10)
    assert recall(plain[1], truth) < 0.9 <= 0.98 <= recall(refined[1], truth)
    exact_scores = np.take_along_axis(queries @ vectors.T, refined[1], 1)
    assert np.allclose(refined[0], exact_scores, atol=2e-3)  # scores are inner products (float16 vectors)


def test_training_sample_is_sized_to_the_lists(tmp_path, corpus, caplog):
    vectors, _ = corpus
    with caplog.at_level(logging.INFO, logger="pipeline.retrieval.ondisk"):
        build(tmp_path / "few", vectors, factory="IVF16,PQ16", train_size=400)  # 25 per list
        assert "under 39 per list for 16 lists (624)" in caplog.text
        caplog.clear()
        builder = IndexBuilder(RetrievalConfig(factory="IVF1024,PQ16", train_size=10**6), DIM, str(tmp_path / "x"))
        assert builder.train_size == 256 * 1024  # k-means would not use more: never buffered
        assert "buffering 262144 vectors" in caplog.text
        builder = IndexBuilder(RetrievalConfig(factory="IVF16,PQ16", train_size=10**6), DIM, str(tmp_path / "y"))
        assert builder.train_size == 65536  # what the PQ codebooks train on, when more than 256 per list
    with pytest.raises(ValueError, match=r"retrieval.shards=2 needs an IVF factory"):
        IndexBuilder(RetrievalConfig(factory="HNSW16", shards=2), DIM, str(tmp_path / "hnsw"))


def test_empty_shards_and_lists_kept_in_ram(tmp_path, corpus):
    import faiss

    from pipeline.retrieval.ondisk import OnDiskIVFWriter
    from pipeline.retrieval.search import IndexShard

    vectors, queries = corpus
    index = faiss.index_factory(DIM, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[:400])
    writer = OnDiskIVFWriter(index, tmp_path, piece_size=10, shards=4)
    writer.add(vectors[:1], 0)  # one vector: three shards stay empty
    files, total = writer.finish()
    assert total == 1 and sum(f.endswith(".ivfdata") for f in files) == 1 and len(files) == 5
    shards = [IndexShard(tmp_path / f"index-{i}-of-4.faiss", nprobe=4, ef_search=16, k_factor=1) for i in range(4)]
    scores, rows = merge_topk([shard.search(queries[:2], 3) for shard in shards], 3)
    assert rows[:, 0].tolist() == [0, 0] and (rows[:, 1:] == -1).all()

    # fast-scan lists are blocks of interleaved codes: built in RAM, searched as before
    meta = build(tmp_path / "fs", vectors, factory="IVF16,PQ16x4fs", train_size=1200, refine="float16")
    assert meta["index_files"] == ["index.faiss", "vectors.f16"]
    found = Retriever(RetrievalConfig(index_dir=str(tmp_path / "fs"), nprobe=16, refine="float16", k_factor=50),
                      LOCAL).search_vectors(vectors[:5], 1)[1]
    assert found[:, 0].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"shards=32 is more than the 16 lists"):
        IndexBuilder(RetrievalConfig(factory="IVF16,PQ16", shards=32), DIM, str(tmp_path / "many"))


def test_a_shard_in_its_own_deployment_answers_as_in_the_replica(tmp_path, corpus, ray_session):
    """retrieval.shards_apart: two IndexShardReplica deployments, the retrieval replica merges
    their hits; the passages found equal those of an in-process retriever over the same version."""
    from ray import serve

    from pipeline.infra.config import Config
    from pipeline.runtime.ray_connect import init_ray
    from pipeline.retrieval.index import passage_texts, read_corpus
    from pipeline.services.deploy import apart_shards, replica_demands, retriever_application

    from conftest import REPO

    corpus_path = str(REPO / "data" / "demo" / "corpus.parquet")
    cfg = Config()
    cfg.retrieval = RetrievalConfig(corpus=corpus_path, index_dir=str(tmp_path / "demo"), factory="IVF4,Flat",
                                    train_size=200, shards=2, shards_apart=True, nprobe=4, refine="float16")
    from pipeline.retrieval.index import build_index_in_process

    build_index_in_process(cfg.retrieval, LOCAL, cfg.retrieval.index_dir)
    assert apart_shards(cfg) == ["index-0-of-2.faiss", "index-1-of-2.faiss"]
    assert [what for what, _ in replica_demands(cfg, retrieval=True)].count("retrieval.shard_service") == 2
    queries = passage_texts(read_corpus(LOCAL, corpus_path).slice(0, 5))
    expected = Retriever(replace(cfg.retrieval, shards_apart=False), LOCAL).search(queries, 4)
    init_ray(None, configure_logging=False)
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(retriever_application(cfg, None), name="sharded", route_prefix=None)
        found = handle.search.remote(queries, 4).result(timeout_s=120)
        deployments = serve.status().applications["sharded"].deployments
        assert {"SelfRagIndexShard0", "SelfRagIndexShard1", "SelfRagRetriever"} <= set(deployments)
    finally:
        serve.shutdown()
    assert json.dumps(found, sort_keys=True) == json.dumps(expected, sort_keys=True)
    assert [hits[0]["id"] for hits in found] == read_corpus(LOCAL, corpus_path).column("id").to_pylist()[:5]
