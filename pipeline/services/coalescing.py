"""Calls that arrive while a search runs are merged into the next one.

A retrieval replica searches one call at a time (its encoder and FAISS use their own threads).
Long-form rows search once per tree depth with one or two queries each, so many small calls
queue behind each other, and each pays the encoder's and the index's fixed cost. Here, calls
that queued while a search ran go into the next search together (those with the same ``k``),
and each caller gets its own slice of the hits back, in the order the calls came, up to
``max_queries`` queries a search (a call with more runs alone). Nothing waits for a batch to
fill: a call that arrives at an idle replica runs at once. The limit keeps results flowing
when many calls come at once: at the start of a run, 20 batches' queries merged into one
search of about 500 queries, and the engine waited 1 s for the first batch's passages.

A merged search that fails is run again call by call, so that a failure costs only the call
that causes it (the retrieve stage isolates a bad row by splitting its batch; a long-form tree
stops on a failed search): the calls merged with it get their hits as if they had run alone.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

Search = Callable[[list[str], int], Awaitable[list[list[dict]]]]
Call = tuple[list[str], int, asyncio.Future]


class CoalescingSearch:
    """Runs ``search(queries, k)`` one call at a time, merging the calls that wait."""

    def __init__(self, search: Search, max_queries: int | None = None):
        self._search = search
        self.max_queries = max_queries
        self._waiting: list[Call] = []
        self._task: asyncio.Task | None = None

    async def __call__(self, queries: list[str], k: int) -> list[list[dict]]:
        """The top ``k`` hits of each query, as ``search`` gives them."""
        if not queries:
            return []
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((list(queries), k, done))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        calls: list[Call] = []
        try:
            while self._waiting:
                k = self._waiting[0][1]
                calls, self._waiting = self._next_search(k)
                if len(calls) > 1:
                    await self._merged(calls, k)
                elif calls:
                    await self._alone(calls[0], k)
        except BaseException:  # cancelled (the replica shuts down): no caller waits for ever
            for _, _, done in calls + self._waiting:
                if not done.done():
                    done.set_exception(RuntimeError("the search was cancelled"))
            self._waiting = []
            raise
        finally:
            self._task = None

    def _next_search(self, k: int) -> tuple[list[Call], list[Call]]:
        """(the calls of the next search, those left waiting): calls with ``k`` in arrival order
        until one would take the search past ``max_queries`` queries; calls given up meanwhile
        are dropped."""
        calls, rest, total, full = [], [], 0, False
        for call in self._waiting:
            queries, call_k, done = call
            if call_k == k and done.done():
                continue
            full = full or (call_k == k and bool(calls) and bool(self.max_queries)
                            and total + len(queries) > self.max_queries)
            if call_k != k or full:
                rest.append(call)
            else:
                calls.append(call)
                total += len(queries)
        return calls, rest

    async def _merged(self, calls: list[Call], k: int) -> None:
        merged = [q for queries, _, _ in calls for q in queries]
        try:
            found = await self._hits(merged, k)
        except Exception:  # noqa: BLE001 - run each call alone: the failure is only its own call's
            for call in calls:
                await self._alone(call, k)
            return
        start = 0
        for queries, _, done in calls:
            if not done.done():  # a caller that gave up (cancelled) gets nothing
                done.set_result(found[start:start + len(queries)])
            start += len(queries)

    async def _alone(self, call: Call, k: int) -> None:
        queries, _, done = call
        if done.done():  # given up meanwhile
            return
        try:
            found = await self._hits(queries, k)
        except Exception as exc:  # noqa: BLE001 - the caller gets the search's own error
            if not done.done():
                done.set_exception(exc)
            return
        if not done.done():
            done.set_result(found)

    async def _hits(self, queries: list[str], k: int) -> list[list[dict]]:
        found = await self._search(queries, k)
        if len(found) != len(queries):
            raise RuntimeError(f"the search returned {len(found)} hit lists for {len(queries)} queries")
        return found
