"""The retrieval service: query encoder + FAISS index + passage store as a Ray Serve deployment.

The retrieve stage and the long-form per-segment searches both call it; no stage holds a
retriever of its own. Searches run in one worker thread per replica (the encoder and FAISS use
their own threads), so the replica's event loop stays free for health checks.

A sharded index (``retrieval.shards``) is searched whole by every replica, or, with
``retrieval.shards_apart``, one shard per ``IndexShardReplica`` deployment whose hits the
retrieval replicas merge.

A replica loads exactly the index version in ``cfg.index_dir`` (the run's preflight resolved the
location's ``CURRENT`` to it): it never follows the pointer itself, so a replica that Serve
restarts mid-run loads the same version again, whatever was built at the location since.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from ..infra.config import RetrievalConfig, StorageConfig
from .coalescing import CoalescingSearch
from .reporting import ReportingReplica


class RetrieverReplica(ReportingReplica):
    """Serve deployment body: one retriever (``pipeline.retrieval.index.Retriever``). With
    ``shards`` (handles of ``IndexShardReplica`` deployments, ``retrieval.shards_apart``) it
    encodes the queries, asks every shard for its hits and merges them; otherwise it searches
    every shard of the version itself."""

    async def __init__(self, cfg: RetrievalConfig, storage: StorageConfig, shards: list | None = None,
                       metrics: str | None = None):
        from ..infra.io import Storage
        from ..retrieval.index import Retriever

        start = time.perf_counter()
        self.announce("retriever", metrics)
        self.shards = list(shards or [])
        self.retriever = Retriever(cfg, Storage(storage), exact=True, load_shards=not self.shards)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search")
        self.coalesced = CoalescingSearch(self._search, cfg.encode_batch_size)
        # and calls (ReportingReplica); encode_cpu_seconds: the query encoder's model (on a GPU
        # with retrieval.device=cuda, its CPU share is launching the kernels)
        self.counters = {"seconds": 0.0, "queries": 0, "searches": 0, "encode_cpu_seconds": 0.0}
        self.start_reporting(self.counters, time.perf_counter() - start)

    async def index_meta(self) -> dict:
        """The ``meta.json`` of the index version this replica searches (a job reusing a running
        retrieval service checks it is the version its identity names)."""
        return self.retriever.meta

    async def search(self, queries: list[str], k: int, metrics: str | None = None) -> list[list[dict]]:
        """Top-k passages per query, best first, each with its ``retrieval_score``; ``metrics``:
        the calling job's metrics actor. Calls that arrive while a search runs are searched
        together next (``coalescing``)."""
        self.begin(metrics)
        try:
            found = await self.coalesced(queries, k)
        finally:
            self.end()
        self.counters["queries"] += len(queries)
        return found

    async def _search(self, queries: list[str], k: int) -> list[list[dict]]:
        start = time.perf_counter()
        loop, r = asyncio.get_running_loop(), self.retriever
        if not self.shards:
            found = await loop.run_in_executor(self.pool, r.search, queries, k)
        else:
            vectors = await loop.run_in_executor(self.pool, r.encoder.encode_queries, queries)
            parts = await asyncio.gather(*(shard.search.remote(vectors, r.candidates(k)) for shard in self.shards))
            found = await loop.run_in_executor(self.pool, lambda: r.passages(*r.rank(vectors, parts, k)))
        self.counters["seconds"] += time.perf_counter() - start
        self.counters["searches"] += 1
        self.counters["encode_cpu_seconds"] = r.encoder.cpu_seconds
        return found

    def close(self) -> None:
        """The last report; the search thread ends."""
        self.stop_reporting()
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    def __del__(self):
        self.close()


class IndexShardReplica:
    """Serve deployment body: one shard file of the run's index version (``retrieval.shards_apart``),
    searched with query vectors; its lists memory-mapped as in a retrieval replica."""

    def __init__(self, cfg: RetrievalConfig, storage: StorageConfig, shard_file: str):
        from pathlib import Path

        from ..infra.io import Storage
        from ..retrieval.index import META_FILE, load_shard
        from ..retrieval.ondisk import ivfdata_name

        only = (shard_file, ivfdata_name(shard_file), META_FILE)
        local = Path(Storage(storage).localize(cfg.index_dir, only=only, flat=True))
        self.shard = load_shard(cfg, local, shard_file)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-search")

    async def search(self, vectors, k: int):
        """(scores, rows) of this shard's best ``k`` hits per query vector."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.shard.search, vectors, k)
