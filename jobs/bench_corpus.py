"""Benchmark of an index build and its search at corpus scale, with a memory model for 21M passages.

    python -m jobs.bench_corpus [--sizes 1000000,2000000] [--queries 200] [--nlist 2048]

For each size (ascending):
1. Generates that many 768-dimensional vectors with cluster structure (topics, subtopics within
   them, noise; not normalised, as Contriever's are not) as ``.npy`` shards, and a corpus of as
   many passages.
2. Builds the index in a fresh process with the project's own import path
   (``python -m jobs.build_index retrieval.embeddings=... retrieval.embeddings_format=npy``) and
   the production factory's settings (IVF with PQ128 codes, on-disk lists, float16 refine store),
   with the number of lists fixed across sizes, so that only the corpus grows; records the build's
   wall time and peak memory (peak RSS, and peak anonymous RSS: what cannot be paged out).
3. Searches it in another fresh process (the shards, the refine store and the passage store as a
   retrieval replica loads them; batched query vectors, no encoder) and records its RSS,
   queries/s and recall@10 against exact search over all vectors.

The last line is JSON: ``vectors``, ``build_seconds``, ``build_peak_rss_gb``, ``serve_rss_gb``,
``recall_at_10`` and ``queries_per_s`` of the largest size, per-size figures under ``sizes``,
and ``projected_21m_build_peak_gb`` / ``projected_21m_serve_gb`` from the memory model below
(see docs/retrieval-index.md, "Retrieval at 21M passages").

Memory model (bytes; N passages, d = 768, L lists, m = PQ bytes per vector, T training vectors,
P build piece size, C add chunk size, E the query encoder's weights in float32):
    build  = B_build + 8 d T + 4 d L + (m + 8) P + 4 d C
             (the training sample, and FAISS's residuals of it while the PQ codebooks train)
    serve  = B_serve + 4 d L + (m + 8) N + E
             (every on-disk list resident: the worst case; E = 0.44 GB for BERT-base)
B_build is the largest size's measured peak RSS minus its model terms; B_serve its measured RSS
after the queries minus its quantizer (what it had touched of the lists, the refine store and
the passage store stays in B_serve: the same queries touch as many pages at any size). The
float16 refine store (2 d N, rows read with pread) and the passage store (memory-mapped) are
files of which a query reads a page per candidate: page cache, which the kernel reclaims, not counted beyond that.
"""

from __future__ import annotations

import argparse

from pipeline.bench.corpus import benchmark, serve


def main(argv: list[str] | None = None) -> dict | None:
    """Entrypoint: runs the benchmark (or, with --serve, one search process of it); returns its
    figures (also printed as JSON)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,2000000", help="corpus sizes, comma-separated (ascending)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--decay", type=float, default=0.75,
                        help="power-law exponent of the noise spectrum (0: isotropic noise)")
    parser.add_argument("--nlist", type=int, default=2048, help="IVF lists (the same at every size)")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--k-factor", type=float, default=32.0)
    parser.add_argument("--pq", type=int, default=128, help="PQ bytes per vector")
    parser.add_argument("--piece", type=int, default=1_000_000, help="retrieval.build_piece_size")
    parser.add_argument("--serve", nargs=3, metavar=("VERSION", "QUERIES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(*args.serve, nprobe=args.nprobe, k_factor=args.k_factor, batch=64)
        return None
    return benchmark(args)


if __name__ == "__main__":
    main()
