"""The index build (``python -m jobs.build_index``): a new version of the index location
``retrieval.index_dir``, from the corpus embedded by a Ray Data actor pool, or from precomputed
passage vectors (``retrieval.embeddings``) with no encoder and no Ray."""

from __future__ import annotations

import time

from ..infra.config import Config
from ..infra.io import Storage, join
from ..runtime.ray_connect import init_ray
from ..retrieval.index import CURRENT_FILE, IndexBuilder, build_version, check_buildable, corpus_fingerprint


def import_embeddings(cfg: Config) -> dict:
    """Build a new version of the index at ``retrieval.index_dir`` from the precomputed vectors
    of ``retrieval.embeddings`` and the passages of ``retrieval.corpus`` (no encoder over the
    corpus, no Ray); returns the index metadata."""
    from ..retrieval.embeddings import EmbeddingsImport

    storage, r = Storage(cfg.storage), cfg.retrieval
    if not storage.exists(r.corpus):
        raise FileNotFoundError(f"corpus not found: {r.corpus}")
    check_buildable(storage, r.index_dir)
    job = EmbeddingsImport(r, storage)  # lists the files and reads the encoder's dimension before any version exists
    version, meta = build_version(storage, r.index_dir, job.build)
    print(f"index version {version} written; {join(r.index_dir, CURRENT_FILE)} names it", flush=True)
    return meta


def build(cfg: Config) -> dict:
    """Embed the corpus and build a new version of the index at ``retrieval.index_dir``; returns
    the index metadata (with timings and the version's name)."""
    if cfg.retrieval.embeddings:  # precomputed vectors: no encoder replicas, no Ray
        return import_embeddings(cfg)
    import ray

    from ..retrieval.corpus import corpus_dataset
    from ..stages.embed import EmbedPassages, split_embeddings, tokenize_passages

    storage, r, st = Storage(cfg.storage), cfg.retrieval, cfg.stages.embed
    if not storage.exists(r.corpus):
        raise FileNotFoundError(f"corpus not found: {r.corpus}")
    check_buildable(storage, r.index_dir)
    init_ray(cfg.ray.address, dashboard=cfg.ray.dashboard)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = cfg.ray.progress_bars
    context.execution_options.preserve_order = True  # index row i must be corpus row i

    # Tokenize in CPU tasks (as many as free CPUs allow), embed token ids on the actors: the GPU
    # never waits for the tokenizer. (Ray Data fuses the two where their resources are equal, a
    # CPU-only build; with stages.embed.num_gpus > 0 they stay apart.)
    ds = corpus_dataset(storage, r.corpus).map_batches(
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
        return builder.close({**corpus_fingerprint(storage, r.corpus), **extra_meta,
                              "seconds": round(time.time() - start, 2)})

    version, meta = build_version(storage, r.index_dir, write)
    print(f"index version {version} written; {join(r.index_dir, CURRENT_FILE)} names it", flush=True)
    return meta
