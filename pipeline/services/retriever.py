"""The retrieval service: query encoder + FAISS index + passage store as a Ray Serve deployment.

The retrieve stage and the long-form per-segment searches both call it; no stage holds a
retriever of its own. Searches run in one worker thread per replica (the encoder and FAISS use
their own threads), so the replica's event loop stays free for health checks.

A replica loads exactly the index version in ``cfg.index_dir`` (the run's preflight resolved the
location's ``CURRENT`` to it): it never follows the pointer itself, so a replica that Serve
restarts mid-run loads the same version again, whatever was built at the location since.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from ..config import RetrievalConfig, StorageConfig


class RetrieverReplica:
    """Serve deployment body: one retriever (``pipeline.retrieval.index.Retriever``)."""

    def __init__(self, cfg: RetrievalConfig, storage: StorageConfig):
        from .. import io
        from ..metrics import Reporter
        from ..retrieval.index import Retriever

        start = time.perf_counter()
        io.configure(storage)
        self.retriever = Retriever(cfg, exact=True)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search")
        self.reporter = Reporter("retriever", refresh=True)
        self.reporter.report(init_seconds=time.perf_counter() - start, startups=1, ready_at=time.time())

    async def index_meta(self) -> dict:
        """The ``meta.json`` of the index version this replica searches (a job reusing a running
        retrieval service checks it is the version its identity names)."""
        return self.retriever.meta

    async def search(self, queries: list[str], k: int) -> list[list[dict]]:
        """Top-k passages per query, best first, each with its ``retrieval_score``."""
        start, wall = time.perf_counter(), time.time()
        found = await asyncio.get_running_loop().run_in_executor(self.pool, self.retriever.search, queries, k)
        self.reporter.report(seconds=time.perf_counter() - start, queries=len(queries), calls=1,
                             first_start=wall, last_end=time.time())
        return found
