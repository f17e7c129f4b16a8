"""Calls that arrive while a search runs are merged into the next one.

A retrieval replica searches one call at a time (its encoder and FAISS use their own threads).
Long-form rows search once per tree depth with one or two queries each, so many small calls
queue behind each other, and each pays the encoder's and the index's fixed cost. Here, calls
that queued while a search ran go into the next search together (those with the same ``k``),
and each caller gets its own slice of the hits back. Nothing waits for a batch to fill: a call
that arrives at an idle replica runs at once.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

Search = Callable[[list[str], int], Awaitable[list[list[dict]]]]


class CoalescingSearch:
    """Runs ``search(queries, k)`` one call at a time, merging the calls that wait."""

    def __init__(self, search: Search):
        self._search = search
        self._waiting: list[tuple[list[str], int, asyncio.Future]] = []
        self._running = False

    async def __call__(self, queries: list[str], k: int) -> list[list[dict]]:
        """The top ``k`` hits of each query, as ``search`` gives them."""
        if not queries:
            return []
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((list(queries), k, done))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        try:
            while self._waiting:
                k = self._waiting[0][1]
                calls = [c for c in self._waiting if c[1] == k]
                self._waiting = [c for c in self._waiting if c[1] != k]
                await self._run(calls, k)
        finally:
            self._running = False

    async def _run(self, calls: list[tuple[list[str], int, asyncio.Future]], k: int) -> None:
        merged = [q for queries, _, _ in calls for q in queries]
        try:
            found = await self._search(merged, k)
        except Exception as exc:  # noqa: BLE001 - every merged call fails as its own call would
            for _, _, done in calls:
                if not done.done():
                    done.set_exception(exc)
            return
        start = 0
        for queries, _, done in calls:
            if not done.done():  # a caller that gave up (cancelled) gets nothing
                done.set_result(found[start:start + len(queries)])
            start += len(queries)
