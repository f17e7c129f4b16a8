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

from pipeline.infra.config import ConfigError, load_config
from pipeline.infra.console import print_error
from pipeline.runtime.ray_connect import stop_ray
from pipeline.run.index_build import build
from pipeline.runtime.process_exit import exit_process


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
    exit_process(main())
