"""Build a retrieval index from a passage corpus with a Ray Data embedding actor pool.

    python -m jobs.build_index [--config FILE ...] [key=value ...]

Reads ``retrieval.corpus`` (Parquet, JSON Lines, or DPR TSV; local or s3://), embeds passages
as ``title + " " + text`` with ``retrieval.encoder`` on ``stages.embed`` replicas, builds the
FAISS index ``retrieval.factory`` (trainable ones on the first ``retrieval.train_size``
vectors, then filled in chunks), and writes index.faiss, passages.arrow and meta.json to
``retrieval.index_dir`` (local or s3://). Also works under ``ray job submit``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time

from pipeline import io
from pipeline.config import Config, ConfigError, load_config
from pipeline.ray_connect import init_ray
from pipeline.retrieval.index import IndexBuilder, corpus_fingerprint


def build(cfg: Config) -> dict:
    """Embed the corpus and build the index; returns the index metadata (with timings)."""
    import ray

    from pipeline.retrieval.corpus import corpus_dataset
    from pipeline.stages.embed import EmbedPassages, split_embeddings

    io.configure(cfg.storage)
    r, st = cfg.retrieval, cfg.stages.embed
    if not io.exists(r.corpus):
        raise FileNotFoundError(f"corpus not found: {r.corpus}")
    init_ray(cfg.ray.address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = cfg.ray.progress_bars
    context.execution_options.preserve_order = True  # index row i must be corpus row i

    ds = corpus_dataset(r.corpus).map_batches(
        EmbedPassages, fn_constructor_kwargs={"cfg": cfg}, compute=ray.data.ActorPoolStrategy(size=st.replicas),
        batch_size=st.batch_size,
        num_cpus=st.num_cpus, num_gpus=st.num_gpus, batch_format="pyarrow")
    start = time.time()
    local = r.index_dir if not io.is_remote(r.index_dir) else tempfile.mkdtemp(prefix="selfrag-index-")
    builder = None
    for batch in ds.iter_batches(batch_size=r.add_chunk_size, batch_format="pyarrow"):
        passages, vectors = split_embeddings(batch)
        builder = builder or IndexBuilder(r, vectors.shape[1], local)
        builder.add(passages, vectors)
        rate = builder.count / (time.time() - start)
        print(f"embedded and indexed {builder.count} passages ({rate:.0f}/s)", flush=True)
    if builder is None:
        raise ValueError(f"corpus {r.corpus} has no passages")
    meta = builder.close({**corpus_fingerprint(r.corpus), "seconds": round(time.time() - start, 2)})
    if io.is_remote(r.index_dir):
        io.upload_dir(local, r.index_dir)
    return meta


def main(argv: list[str] | None = None) -> int:
    """Entrypoint: 0 on success, 2 for a refused config or a missing corpus."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m jobs.build_index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar="FILE")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        meta = build(load_config(args.config, args.overrides))
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(meta), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
