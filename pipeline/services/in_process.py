"""The services in the driver's own process, for a run without Ray (``runner``, see
``pipeline.run.in_process``).

Each replica is the class Serve would run (``EngineReplica``, ``SimulatedEngineReplica``,
``RetrieverReplica``), built on a thread of its own with its own event loop, as it would be in
an actor of its own: the engine and the retriever load side by side while the driver prepares
the rows, and a replica's blocking work never holds up the stages' event loop. The clients
implement the stages' ``EngineClient`` and ``RetrieverClient``; a replica that died ends the run
(``ServiceUnavailable``: no other replica takes over in one process; a rerun resumes).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

from .clients import ServiceUnavailable

#: How long closing a replica waits for its last report and its engine's shutdown.
CLOSE_TIMEOUT_S = 60.0


class InProcessReplica:
    """One replica object, ``cls(*args)``, built and served on a thread of its own (``name``: the
    thread's name and the service's in messages). ``ready`` resolves to the replica, or to the
    exception its construction raised. ``request_timeout_s`` bounds each call and
    ``start_timeout_s`` the wait for the build (the service's settings, as on Ray)."""

    def __init__(self, name: str, cls, *args, request_timeout_s: float | None = None,
                 start_timeout_s: float | None = None):
        self.name, self.request_timeout_s, self.start_timeout_s = name, request_timeout_s, start_timeout_s
        self.loop = asyncio.new_event_loop()
        self.ready: Future = Future()
        self._lock, self._closed = threading.Lock(), False
        self.thread = threading.Thread(target=self._serve, args=(cls, args), name=f"{name}-replica", daemon=True)
        self.thread.start()

    def _serve(self, cls, args) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            replica = object.__new__(cls)  # Serve's replica classes have an asynchronous __init__
            self.loop.run_until_complete(replica.__init__(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the replica
            self.ready.set_exception(exc)
            self.loop.close()
            return
        with self._lock:
            closed = self._closed
            if not closed:
                self.ready.set_result(replica)
        if closed:  # the run ended while this replica was being built: it shuts down at once
            self.loop.run_until_complete(_close(replica))
        else:
            self.loop.run_forever()
        self.loop.close()

    async def built(self):
        """The replica, once built (its construction's exception if it failed). Waiting callers
        that are cancelled leave the construction alone."""
        return await asyncio.shield(asyncio.wrap_future(self.ready))

    async def call(self, method: str, *args):
        """``await replica.method(*args)`` on the replica's own loop; ServiceUnavailable past
        ``request_timeout_s`` (no other replica takes the call over in one process)."""
        replica = await self.built()
        running = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(getattr(replica, method)(*args), self.loop))
        try:
            return await asyncio.wait_for(running, self.request_timeout_s)
        except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11)
            raise ServiceUnavailable(f"the {self.name} did not answer within {self.request_timeout_s:g} s "
                                     "(request_timeout_s); rerun the job to resume") from None

    def close(self) -> None:
        """Shut the replica down (its last report, its engine) and end its thread. A replica
        still being built shuts down as soon as it is (the process does not wait for it)."""
        with self._lock:
            self._closed = True
            if not self.ready.done() or self.ready.exception() is not None:
                return
        try:
            asyncio.run_coroutine_threadsafe(_close(self.ready.result()), self.loop).result(CLOSE_TIMEOUT_S)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(CLOSE_TIMEOUT_S)


async def _close(replica) -> None:
    """``replica.close()`` on its own loop (its report task and engine belong to that loop)."""
    replica.close()


class InProcessEngineClient:
    """``EngineClient`` over an in-process engine replica; ``calls``: the calls answered."""

    def __init__(self, replica: InProcessReplica):
        self.replica, self.calls = replica, 0

    async def generate(self, prompts, max_tokens, route, stop_ids=(), priority=0):
        from .engine import EngineUnavailable

        if not prompts:
            return []
        request = {"prompts": [list(p) for p in prompts], "max_tokens": list(max_tokens), "stop_ids": list(stop_ids),
                   "priority": priority}
        try:
            out = await self.replica.call("generate", request)
        except EngineUnavailable as exc:
            raise ServiceUnavailable(f"the engine died ({exc}); rerun the job to resume") from exc
        self.calls += 1
        return out


class InProcessRetrieverClient:
    """``RetrieverClient`` over an in-process retrieval replica; ``calls``: the calls answered."""

    def __init__(self, replica: InProcessReplica):
        self.replica, self.calls = replica, 0

    async def search(self, queries, k):
        if not queries:
            return []
        out = await self.replica.call("search", list(queries), k)
        self.calls += 1
        return out
