"""The benchmark of the index build and of search at corpus scale (``make bench-index``; what it
measures: ``python -m jobs.bench_index --help``)."""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import resource
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path("outputs/bench_index")
SYLLABLES = "ka lo ri ven tor mel sa du qui nor fa ze bri tal os mun pe gra li vo".split()
KINDS = ["river", "city", "company", "mountain", "language", "painter", "island", "festival"]
WORDS = "north south old great small famous ancient modern long quiet bright".split()
APPROX = {"IVF-PQ": ("IVF1024,PQ48", {"nprobe": 32}),
          "IVF-PQ+refine": ("IVF1024,PQ48,RFlat", {"nprobe": 16, "k_factor_rf": 8}),
          "HNSW": ("HNSW32", {"efSearch": 128})}


def name(rng: random.Random) -> str:
    """An invented name of 2-4 syllables."""
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()


def write_corpus(path: Path, n: int, seed: int = 0) -> list[str]:
    """n passages of about 20 words; returns one question per passage (for search queries)."""
    rng = random.Random(seed)
    ids, titles, texts, questions = [], [], [], []
    for i in range(n):
        title, kind, other = name(rng), rng.choice(KINDS), name(rng)
        texts.append(f"{title} is a {rng.choice(WORDS)} {kind} near {other}. It was founded in "
                     f"{rng.randint(1000, 2000)} by {name(rng)}, and people there speak {name(rng)}.")
        ids.append(f"p{i:07d}"), titles.append(title)
        questions.append(f"Which {kind} lies near {other}?")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "title": titles, "text": texts}), path)
    return questions


class PeakMemory:
    """Samples, in a thread, the largest unique memory (USS: not counting shared pages such as
    Ray's object store) of any process whose command line contains ``marker``."""

    def __init__(self, marker: str, every_s: float = 0.5):
        import threading

        self.marker, self.every_s, self.peak_mb = marker, every_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.every_s):
            for proc in psutil.process_iter(["cmdline"]):
                if self.marker in " ".join(proc.info["cmdline"] or []):
                    try:
                        self.peak_mb = max(self.peak_mb, proc.memory_full_info().uss / 2**20)
                    except psutil.Error:
                        pass

    def stop(self) -> float:
        """Stop sampling; the peak in MiB."""
        self._stop.set()
        self._thread.join()
        return round(self.peak_mb)


def _build(out: Path, factory: str, vectors_path: str, train_size: int, queue) -> None:
    import faiss
    import psutil

    vectors = np.load(vectors_path, mmap_mode="r")
    baseline_mb = psutil.Process().memory_info().rss / 2**20
    start = time.time()
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(np.ascontiguousarray(vectors[:train_size]))
    for i in range(0, len(vectors), 16384):
        index.add(np.ascontiguousarray(vectors[i:i + 16384]))
    seconds = time.time() - start
    faiss.write_index(index, str(out / f"{factory.replace(',', '_')}.faiss"))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"build_seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb),
               "build_peak_minus_baseline_mb": round(peak_mb - baseline_mb)})


def build_in_child(out: Path, factory: str, vectors_path: str, train_size: int) -> dict:
    """Build and save one index in a fresh process; its build time, peak memory, and peak
    minus the memory the process held before building (interpreter, FAISS, mapped vectors)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_build, args=(out, factory, vectors_path, train_size, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def search(index, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, float]:
    """(ids, queries per second) of one batched search."""
    start = time.time()
    _, ids = index.search(queries, k)
    return ids, len(queries) / (time.time() - start)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k ids that the approximate search found."""
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact)]))


def benchmark(n_passages: int, n_queries: int, embed_threads: int, out: Path, reuse: bool) -> dict:
    """Run the benchmark on ``n_passages`` generated passages and ``n_queries`` questions, the
    embedding replica with ``embed_threads`` torch threads, working files under ``out``
    (``reuse``: the corpus, Flat index and vectors of the previous run); prints the figures and
    returns them."""
    import faiss

    from ..infra.config import load_config
    from ..infra.io import Storage
    from ..retrieval.encoder import Encoder
    from ..retrieval.index import INDEX_FILE, resolve_index
    from ..run.index_build import build
    from .common import print_figures

    corpus = out / "corpus.parquet"
    questions = write_corpus(corpus, n_passages)
    cfg = load_config([], [f"retrieval.corpus={corpus}", f"retrieval.index_dir={out / 'flat'}",
                           "retrieval.factory=Flat", "ray.progress_bars=false",
                           f"retrieval.threads={embed_threads}"])
    vectors_path = str(out / "vectors.npy")
    if not reuse:
        start = time.time()
        actor_memory = PeakMemory("EmbedPassages")
        meta = build(cfg)
        embed_seconds = time.time() - start
        embedding = {
            "passages": meta["passages"], "dim": meta["dim"], "encoder": meta["encoder"],
            "embed_threads": embed_threads,
            "embed_and_flat_build_seconds": round(embed_seconds, 1),
            "embedding_passages_per_s": round(meta["passages"] / embed_seconds, 1),
            "flat_build_driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "embedding_actor_peak_uss_mb": actor_memory.stop(),
        }
        flat = faiss.read_index(str(out / "flat" / meta["version"] / INDEX_FILE))  # the version just built
        np.save(vectors_path, flat.reconstruct_n(0, flat.ntotal))
        (out / "embedding.json").write_text(json.dumps(embedding))
    embedding = json.loads((out / "embedding.json").read_text())
    flat = faiss.read_index(str(Path(resolve_index(Storage(cfg.storage), str(out / "flat"))) / INDEX_FILE))
    queries = Encoder(cfg.retrieval).encode(random.Random(1).sample(questions, n_queries))
    exact, flat_qps = search(flat, queries)
    result = {**embedding, "flat_search_qps": round(flat_qps, 1), "indexes": {}}
    space = faiss.ParameterSpace()
    for label, (factory, params) in APPROX.items():
        built = build_in_child(out, factory, vectors_path, train_size=min(100_000, n_passages))
        index = faiss.read_index(str(out / f"{factory.replace(',', '_')}.faiss"))
        for key, value in params.items():
            space.set_index_parameter(index, key, value)
        ids, qps = search(index, queries)
        result["indexes"][label] = {
            "factory": factory, **params, **built, "search_qps": round(qps, 1),
            "speedup_vs_flat": round(qps / flat_qps, 1), "recall_at_10": round(recall_at_k(ids, exact), 4),
        }
    print_figures("index benchmark figures", result)
    return result
