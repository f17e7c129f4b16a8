"""A batch's long-form trees call the services together: the calls made in one turn of the
event loop go as one call.

A batch's long-form trees run side by side (``asyncio.gather``), and each asks for its own
search and its own generation at every depth, one or two queries or a few prompts at a time.
Those calls are made in the same turn of the event loop (the trees start together, and the
answer of a merged call wakes them together), so ``SameTurnBatcher`` merges them into one call
per key (the engine's: routing key and stop ids, so one call per routing key the batch's trees
have; the retriever's: k) and gives each caller its own slice of the answer. Nothing waits for a batch to fill: the merged call is sent at the end
of the turn its first call was made in. The critique stage makes one pair of wrapped clients
per batch (``TurnBatchedEngine``, ``TurnBatchedRetriever``): a batch's trees are merged, the
batches in flight are not, so that each batch's calls come back as soon as they are done
rather than with every other batch's (merged over a whole run, rows went to the engine in
waves that end with their longest generation).

A merged call that fails is sent again call by call, so that a failure costs only the call that
causes it, as if it had been sent alone; a failure that is no call's fault (``fatal``: a service
gone for good) fails every caller at once.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Hashable, Sequence

Send = Callable[[Hashable, list], Awaitable[Sequence]]


class SameTurnBatcher:
    """``await batcher(key, items)``: ``send(key, items)``'s answer (one per item), with the calls
    of one event-loop turn that share ``key`` sent together."""

    def __init__(self, send: Send, fatal: tuple[type[BaseException], ...] = ()):
        self._send, self._fatal = send, fatal
        self._waiting: dict[Hashable, list[tuple[list, asyncio.Future]]] = {}
        self._sending: set[asyncio.Task] = set()  # held: the loop keeps only weak references to tasks

    async def __call__(self, key: Hashable, items: Sequence) -> list:
        loop = asyncio.get_running_loop()
        if not self._waiting:
            loop.call_soon(self._flush)
        done = loop.create_future()
        self._waiting.setdefault(key, []).append((list(items), done))
        return await done

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for key, calls in waiting.items():
            task = asyncio.ensure_future(self._merged(key, calls) if len(calls) > 1 else self._alone(key, *calls[0]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _merged(self, key: Hashable, calls: list[tuple[list, asyncio.Future]]) -> None:
        try:
            answer = await self._answer(key, [item for items, _ in calls for item in items])
        except asyncio.CancelledError:
            self._fail(calls, RuntimeError("the merged call was cancelled"))
            raise
        except self._fatal as exc:
            self._fail(calls, exc)
            return
        except Exception:  # noqa: BLE001 - each call again alone: the failure is only its own call's
            # (not halves, as ``common.run_isolated``: a turn merges a few calls, each of its own caller)
            await asyncio.gather(*(self._alone(key, items, done) for items, done in calls))
            return
        start = 0
        for items, done in calls:
            if not done.done():  # a caller that gave up (cancelled) gets nothing
                done.set_result(answer[start:start + len(items)])
            start += len(items)

    async def _alone(self, key: Hashable, items: list, done: asyncio.Future) -> None:
        try:
            answer = await self._answer(key, items)
        except asyncio.CancelledError:
            self._fail([(items, done)], RuntimeError("the call was cancelled"))
            raise
        except Exception as exc:  # noqa: BLE001 - the caller gets the service's own error
            self._fail([(items, done)], exc)
            return
        if not done.done():
            done.set_result(answer)

    async def _answer(self, key: Hashable, items: list) -> list:
        answer = list(await self._send(key, items))
        if len(answer) != len(items):
            raise RuntimeError(f"the service answered {len(answer)} items for {len(items)}")
        return answer

    @staticmethod
    def _fail(calls: list[tuple[list, asyncio.Future]], exc: BaseException) -> None:
        for _, done in calls:
            if not done.done():
                done.set_exception(exc)


class TurnBatchedEngine:
    """An ``EngineClient`` over ``engine`` whose calls of one turn, with one route, the same
    stop ids and priority, go to it as one call."""

    def __init__(self, engine, fatal: tuple[type[BaseException], ...] = ()):
        self.engine = engine
        self.batcher = SameTurnBatcher(self._send, fatal)

    async def generate(self, prompts, max_tokens, route, stop_ids=(), priority=0):
        if not prompts:
            return []
        return await self.batcher((route, tuple(stop_ids), priority), list(zip(prompts, max_tokens, strict=True)))

    async def _send(self, key, items):
        route, stop_ids, priority = key
        return await self.engine.generate([p for p, _ in items], [m for _, m in items], route, list(stop_ids),
                                          priority)


class TurnBatchedRetriever:
    """A ``RetrieverClient`` over ``retriever`` whose searches of one turn with the same k go to
    it as one search."""

    def __init__(self, retriever, fatal: tuple[type[BaseException], ...] = ()):
        self.retriever = retriever
        self.batcher = SameTurnBatcher(self._send, fatal)

    async def search(self, queries, k):
        if not queries:
            return []
        return await self.batcher(k, list(queries))

    async def _send(self, k, queries):
        return await self.retriever.search(queries, k)
