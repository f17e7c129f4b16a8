"""Build a retrieval index from a passage corpus with a Ray Data embedding actor pool.

    python -m jobs.build_index [--config FILE ...] [key=value ...]

Reads ``retrieval.corpus`` (Parquet, JSON Lines, or DPR TSV; local or s3://), embeds passages
as ``title + " " + text`` with ``retrieval.encoder`` on ``stages.embed`` replicas, builds the
FAISS index ``retrieval.factory`` (trainable ones on the first ``retrieval.train_size``
vectors, then filled in chunks; IVF indexes in pieces merged into on-disk inverted lists, in
``retrieval.shards`` shard files; with ``retrieval.refine=float16`` also a float16 copy of every
vector), and writes the index files, passages.arrow and meta.json as a new
version of the index location ``retrieval.index_dir`` (local or s3://): a new directory
``v-<UTC time>-<random>/`` written whole, then ``CURRENT`` switched to it. Runs reading an
earlier version keep it; a later annotation run picks the new one. Also works under
``ray job submit``.

With ``retrieval.embeddings=GLOB`` (and ``retrieval.embeddings_format``: contriever_pickle, npy
or parquet) it builds the same index from precomputed passage vectors instead, such as the
Self-RAG authors' Contriever files: no encoder runs over the corpus and Ray is not started. The
corpus still fills the passage store; the vectors' ids and count must match it, their dimension
``retrieval.encoder``'s (see pipeline/retrieval/embeddings.py). Pickles are read by a restricted
unpickler: one that references anything but numpy arrays and lists of ids is refused (exit 2)
before anything in it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from pipeline import io
from pipeline.config import Config, ConfigError, load_config
from pipeline.console import print_error
from pipeline.ray_connect import init_ray, stop_ray
from pipeline.retrieval.index import CURRENT_FILE, IndexBuilder, build_version, check_buildable, corpus_fingerprint


def import_embeddings(cfg: Config) -> dict:
    """Build a new version of the index at ``retrieval.index_dir`` from the precomputed vectors
    of ``retrieval.embeddings`` and the passages of ``retrieval.corpus`` (no encoder over the
    corpus, no Ray); returns the index metadata."""
    from pipeline.retrieval.embeddings import EmbeddingsImport

    io.configure(cfg.storage)
    r = cfg.retrieval
    if not io.exists(r.corpus):
        raise FileNotFoundError(f"corpus not found: {r.corpus}")
    check_buildable(r.index_dir)
    job = EmbeddingsImport(r)  # lists the files and reads the encoder's dimension before any version exists
    version, meta = build_version(r.index_dir, job.build)
    print(f"index version {version} written; {io.join(r.index_dir, CURRENT_FILE)} names it", flush=True)
    return meta


def build(cfg: Config) -> dict:
    """Embed the corpus and build a new version of the index at ``retrieval.index_dir``; returns
    the index metadata (with timings and the version's name)."""
    if cfg.retrieval.embeddings:  # precomputed vectors: no encoder replicas, no Ray
        return import_embeddings(cfg)
    import ray

    from pipeline.retrieval.corpus import corpus_dataset
    from pipeline.stages.embed import EmbedPassages, split_embeddings, tokenize_passages

    io.configure(cfg.storage)
    r, st = cfg.retrieval, cfg.stages.embed
    if not io.exists(r.corpus):
        raise FileNotFoundError(f"corpus not found: {r.corpus}")
    check_buildable(r.index_dir)
    init_ray(cfg.ray.address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = cfg.ray.progress_bars
    context.execution_options.preserve_order = True  # index row i must be corpus row i

    # Tokenize in CPU tasks (as many as free CPUs allow), embed token ids on the actors: the GPU
    # never waits for the tokenizer. (Ray Data fuses the two where their resources are equal, a
    # CPU-only build; with stages.embed.num_gpus > 0 they stay apart.)
    ds = corpus_dataset(r.corpus).map_batches(
        tokenize_passages, fn_kwargs={"encoder": r.encoder, "max_length": r.max_length},
        batch_size=st.batch_size, batch_format="pyarrow",
    ).map_batches(
        EmbedPassages, fn_constructor_kwargs={"cfg": cfg}, compute=ray.data.ActorPoolStrategy(size=st.replicas),
        batch_size=st.batch_size,
        num_cpus=st.num_cpus, num_gpus=st.num_gpus, batch_format="pyarrow")

    def write(local: str, extra_meta: dict) -> dict:
        start = time.time()
        builder = None
        for batch in ds.iter_batches(batch_size=r.add_chunk_size, batch_format="pyarrow"):
            passages, vectors = split_embeddings(batch)
            builder = builder or IndexBuilder(r, vectors.shape[1], local)
            builder.add(passages, vectors)
            rate = builder.count / (time.time() - start)
            print(f"embedded and indexed {builder.count} passages ({rate:.0f}/s)", flush=True)
        if builder is None:
            raise ValueError(f"corpus {r.corpus} has no passages")
        return builder.close({**corpus_fingerprint(r.corpus), **extra_meta, "seconds": round(time.time() - start, 2)})

    version, meta = build_version(r.index_dir, write)
    print(f"index version {version} written; {io.join(r.index_dir, CURRENT_FILE)} names it", flush=True)
    return meta


def main(argv: list[str] | None = None) -> int:
    """Entrypoint: 0 on success, 2 for a refused config, a missing corpus, or imported vectors that
    are refused (an unsafe pickle, ids, count or dimension that do not match)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m jobs.build_index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar="FILE")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        meta = build(load_config(args.config, args.overrides))
    except KeyboardInterrupt:
        stop_ray()  # a local Ray this job started goes down with all its processes
        print("interrupted by SIGINT: CURRENT still names the version it named before; a build starts afresh",
              file=sys.stderr, flush=True)
        return 130
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print_error(exc)
        return 2
    print(json.dumps(meta), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
