"""The benchmark of an index build and its search at corpus scale, with the memory model for 21M
passages (``make bench-corpus``; what it measures and the model: ``python -m jobs.bench_corpus
--help``). The build runs as ``python -m jobs.build_index``, the search as ``python -m
jobs.bench_corpus --serve`` (``serve``), each in a fresh process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path("outputs/bench_corpus")
DIM, FILE_ROWS, TOPICS, SUBTOPICS, NOISE = 768, 250_000, 512, 16, 0.45
#: The production preset's index (conf/production.yaml) and its 21M-passage settings.
PRODUCTION = {"vectors": 21_015_324, "nlist": 16384, "pq_bytes": 128, "train_size": 1_048_576,
              "build_piece_size": 2_000_000, "add_chunk_size": 16384}
GB = 1e9


def centres(decay: float, seed: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Topic centres, subtopic offsets, and the noise's per-direction scale (a power law of
    exponent ``decay`` over randomly rotated directions, as the spectrum of real text embeddings
    falls off; 0: isotropic noise, which no code of fewer bytes than the vector can rank)."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((TOPICS, DIM)).astype(np.float32)
    offsets = 0.6 * rng.standard_normal((TOPICS, SUBTOPICS, DIM)).astype(np.float32)
    rotation = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0].astype(np.float32)
    scale = np.arange(1, DIM + 1, dtype=np.float64) ** -decay
    scale *= NOISE * np.sqrt(DIM / np.sum(scale ** 2))  # the same noise energy whatever the decay
    return topics, offsets, scale.astype(np.float32)[:, None] * rotation


def generate(n: int, first: int, structure) -> np.ndarray:
    """Vectors ``first`` .. ``first + n``: topic + subtopic + noise (deterministic per row range)."""
    topics, offsets, noise = structure
    rng = np.random.default_rng(first + 1)
    t, s = rng.integers(0, TOPICS, n), rng.integers(0, SUBTOPICS, n)
    return topics[t] + offsets[t, s] + rng.standard_normal((n, DIM), dtype=np.float32) @ noise


def write_data(root: Path, n: int, decay: float) -> tuple[Path, Path]:
    """The .npy shards and the corpus of n passages under ``root`` (reused when complete)."""
    vectors_dir, corpus = root / "vectors", root / "corpus.parquet"
    if (root / ".complete").exists():
        return vectors_dir, corpus
    vectors_dir.mkdir(parents=True, exist_ok=True)
    structure = centres(decay)
    for number, first in enumerate(range(0, n, FILE_ROWS)):
        np.save(vectors_dir / f"emb-{number:04d}.npy", generate(min(FILE_ROWS, n - first), first, structure))
    ids = pa.array([f"p{i:08d}" for i in range(n)])
    pq.write_table(pa.table({"id": ids, "title": ids, "text": pa.array([f"passage {i}" for i in range(n)])}),
                   corpus)
    (root / ".complete").touch()
    return vectors_dir, corpus


def encoder_stub(root: Path) -> Path:
    """A directory holding only a BERT-base config (hidden size 768): the import reads the
    encoder's dimension from it and loads no weights."""
    path = root / "encoder-config"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": DIM,
                                                  "num_attention_heads": 12, "num_hidden_layers": 12}))
    return path


class Peak:
    """Follows a child process's memory in a thread: the last VmHWM read (its peak RSS since
    exec: monotonic, so the last read before exit is the peak) and the largest RssAnon seen.
    (``ru_maxrss`` would count the pages the child shared with this process before exec.)"""

    def __init__(self, pid: int, every_s: float = 0.1):
        self.pid, self.every_s, self.anon_kb, self.hwm_kb = pid, every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                status = status_kb(self.pid)
                self.anon_kb, self.hwm_kb = max(self.anon_kb, status["RssAnon"]), status["VmHWM"]
            except (OSError, KeyError):
                return

    def stop(self) -> tuple[int, int]:
        """(peak RSS, peak anonymous RSS) in kB."""
        self._stop.set()
        self._thread.join()
        return self.hwm_kb, self.anon_kb


def status_kb(pid: int | str = "self") -> dict[str, int]:
    """The kB figures of /proc/<pid>/status (VmRSS, VmHWM, RssAnon, RssFile, ...)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def settings(args) -> list[str]:
    """The build's settings: the production factory's kind with the bench's number of lists."""
    return [f"retrieval.factory=IVF{args.nlist},PQ{args.pq}", "retrieval.refine=float16",
            f"retrieval.train_size={64 * args.nlist}", f"retrieval.build_piece_size={args.piece}",
            f"retrieval.nprobe={args.nprobe}", f"retrieval.k_factor={args.k_factor}"]


def build(root: Path, n: int, args) -> dict:
    """Build the index of size n in a fresh process; its wall time and peak memory."""
    vectors_dir, corpus = write_data(root, n, args.decay)
    location = root / "index"
    shutil.rmtree(location, ignore_errors=True)  # the bench's own index: one version per run, not one more
    command = [sys.executable, "-m", "jobs.build_index", f"retrieval.embeddings={vectors_dir}/emb-*.npy",
               "retrieval.embeddings_format=npy", f"retrieval.corpus={corpus}", f"retrieval.index_dir={location}",
               f"retrieval.encoder={encoder_stub(root)}", "retrieval.normalize=false", *settings(args)]
    start = time.time()
    with open(root / "build.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        peak = Peak(proc.pid)
        while proc.poll() is None:  # a zombie until reaped: its /proc status stays readable meanwhile
            time.sleep(0.1)
        status = proc.returncode
        hwm, anon = peak.stop()
    seconds = time.time() - start
    if status != 0:
        sys.exit(f"the build of {n} vectors failed: see {root / 'build.log'}")
    meta = json.loads((root / "build.log").read_text().strip().splitlines()[-1])
    return {"version": str(location / meta["version"]), "build_seconds": round(seconds, 1),
            "build_peak_rss_gb": round(hwm * 1024 / GB, 3), "build_peak_anon_gb": round(anon * 1024 / GB, 3)}


def queries(count: int, decay: float) -> np.ndarray:
    """Query vectors from the corpus's distribution (rows the corpus does not hold)."""
    return generate(count, 10**12, centres(decay))


def exact_top(root: Path, q: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact inner-product top-k over every generated vector, file by file."""
    best_scores = np.full((len(q), k), -np.inf, np.float32)
    best_rows = np.full((len(q), k), -1, np.int64)
    first = 0
    for path in sorted((root / "vectors").glob("emb-*.npy")):
        block = np.load(path, mmap_mode="r")
        scores = q @ np.asarray(block).T
        rows = np.broadcast_to(np.arange(first, first + len(block)), scores.shape)
        all_scores, all_rows = np.concatenate([best_scores, scores], 1), np.concatenate([best_rows, rows], 1)
        order = np.argsort(-all_scores, axis=1)[:, :k]
        best_scores, best_rows = np.take_along_axis(all_scores, order, 1), np.take_along_axis(all_rows, order, 1)
        first += len(block)
    return best_rows


def serve(version: str, queries_path: str, out_path: str, nprobe: int, k_factor: float, batch: int) -> None:
    """(In a fresh process) load the version as a retrieval replica does, search every query in
    batches, fetch the passages; write the rows found and the process's memory figures."""
    from ..infra.config import RetrievalConfig
    from ..infra.io import Storage
    from ..retrieval.index import PASSAGES_FILE, PassageStore, load_shard, read_meta
    from ..retrieval.search import REFINE_FILE, RefineStore, merge_topk

    meta, local = read_meta(Storage(), version), Path(version)  # a local version
    cfg = RetrievalConfig(index_dir=version, nprobe=nprobe, k_factor=k_factor)
    shards = [load_shard(cfg, local, name) for name in meta["shards"]]
    refine = RefineStore(local / REFINE_FILE, meta["passages"], meta["dim"])
    store = PassageStore(local / PASSAGES_FILE)
    q = np.load(queries_path)
    n, found = int(np.ceil(10 * k_factor)), []
    start = time.perf_counter()
    for i in range(0, len(q), batch):
        part = q[i:i + batch]
        candidates = merge_topk([shard.search(part, n) for shard in shards], n)[1]
        rows = refine.rerank(part, candidates, 10)[1]
        for row in rows:
            store.fetch([int(r) for r in row if r >= 0])
        found.append(rows)
    seconds = time.perf_counter() - start
    mem = status_kb()
    np.save(out_path, np.concatenate(found))
    Path(out_path).with_suffix(".json").write_text(json.dumps({
        "queries_per_s": round(len(q) / seconds, 1), "serve_rss_gb": round(mem["VmRSS"] * 1024 / GB, 3),
        "serve_anon_gb": round(mem["RssAnon"] * 1024 / GB, 3), "serve_peak_rss_gb": round(mem["VmHWM"] * 1024 / GB, 3)}))


def search(root: Path, n: int, version: str, args) -> dict:
    """Serve figures and recall@10 of the version built for size n."""
    q = queries(args.queries, args.decay)
    np.save(root / "queries.npy", q)
    found_path = root / "found.npy"
    subprocess.run([sys.executable, "-m", "jobs.bench_corpus", "--serve", version, str(root / "queries.npy"),
                    str(found_path), "--nprobe", str(args.nprobe), "--k-factor", str(args.k_factor)], check=True)
    found, truth = np.load(found_path), exact_top(root, q)
    recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())]))
    return {**json.loads(found_path.with_suffix(".json").read_text()), "recall_at_10": round(recall, 4)}


def model_terms(vectors: int, nlist: int, pq_bytes: int, train_size: int, piece: int, chunk: int) -> tuple[float, float]:
    """(build, serve) bytes of the memory model's terms that depend on the settings and size
    (serve: all but the lists, which B_serve already holds as measured, and the encoder)."""
    build = 8 * DIM * train_size + 4 * DIM * nlist + (pq_bytes + 8) * piece + 4 * DIM * chunk
    return build, 4 * DIM * nlist


def benchmark(args) -> dict:
    """Run the benchmark for the parsed command line of ``python -m jobs.bench_corpus``; prints
    the figures and returns them."""
    sizes = sorted(int(s) for s in args.sizes.split(","))
    figures = {}
    for n in sizes:
        root = OUT / f"n{n}-decay{args.decay:g}"
        print(f"{n} vectors: generating and building ...", flush=True)
        built = build(root, n, args)
        served = search(root, n, built.pop("version"), args)
        figures[n] = {**built, **served}
        print(f"{n} vectors: {json.dumps(figures[n])}", flush=True)
    n, top = sizes[-1], figures[sizes[-1]]
    bench_build, bench_serve = model_terms(n, args.nlist, args.pq, 64 * args.nlist, min(args.piece, n), 16384)
    p = PRODUCTION
    prod_build, prod_serve = model_terms(p["vectors"], p["nlist"], p["pq_bytes"], p["train_size"],
                                         p["build_piece_size"], p["add_chunk_size"])
    base_build = top["build_peak_rss_gb"] * GB - bench_build
    base_serve = top["serve_rss_gb"] * GB - bench_serve
    lists_21m, encoder = (p["pq_bytes"] + 8) * p["vectors"], 0.44 * GB
    result = {"vectors": n, **{k: top[k] for k in ("build_seconds", "build_peak_rss_gb", "serve_rss_gb",
                                                    "recall_at_10", "queries_per_s")},
              "projected_21m_build_peak_gb": round((base_build + prod_build) / GB, 2),
              "projected_21m_serve_gb": round((base_serve + prod_serve + lists_21m + encoder) / GB, 2),
              "settings": {"nlist": args.nlist, "pq_bytes": args.pq, "nprobe": args.nprobe, "k_factor": args.k_factor,
                           "train_size": 64 * args.nlist, "build_piece_size": args.piece, "refine": "float16"},
              "production_21m": p, "sizes": {str(k): v for k, v in figures.items()}}
    print(json.dumps(result), flush=True)
    return result
