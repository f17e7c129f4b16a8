"""What the stages call: the engine and the retriever, behind small asynchronous interfaces.

``EngineClient.generate`` and ``RetrieverClient.search`` are all the stage logic knows of the
models, so the stages can be tested with fakes (``tests/fakes.py``) in seconds. The Serve
clients here send each call through a deployment handle and retry a call that failed because
a replica died or its engine is being replaced (bounded by ``retries`` and ``timeout_s``);
any other failure is the caller's.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
from typing import Callable, Protocol, Sequence

from ..infra.config import ServiceConfig
from ..selfrag.scoring import Continuation

log = logging.getLogger(__name__)

#: Key of the routing key (``stages.common.route_key``) in an engine request; read by
#: ``routing.RowAffinityRouter``.
ROUTE = "route"
#: Engine priorities, lower first (vLLM honours them with ``scheduling_policy: priority``, set by
#: ``vllm_engine.engine_kwargs``): long-form trees' requests (``URGENT``), then first passes
#: (``FIRST_PASS``), then the rest (0: the critique of retrieved passages).
#: - A tree generates a segment per depth, one after another, and trees whose requests queued
#:   behind short-form ones at each depth ended the run alone (8 simulated replicas: 0.84 busy,
#:   0.86 to 0.90 with trees first). They never wait in an ``InFlightWindow``.
#: - A first pass's answers let its rows' retrieval and critique start. Queued behind
#:   critiques, a second wave of batches reached retrieval all at once, after the critiques, and
#:   the replicas stood idle while it searched.
URGENT, FIRST_PASS = -2, -1
#: Replicas of each application that Serve last announced to this process's router (written by
#: ``routing.RowAffinityRouter.update_replicas``, read by ``InFlightWindow``).
ROUTED_REPLICAS: dict[str, int] = {}


class EngineClient(Protocol):
    """The engine as the stages see it."""

    async def generate(self, prompts: Sequence[Sequence[int]], max_tokens: Sequence[int], route: str,
                       stop_ids: Sequence[int] = (), priority: int = 0) -> list[Continuation | str]:
        """Greedy continuations of token-id prompts (one Continuation, or an error string for a
        prompt the engine refused, per prompt); ``route`` (the rows' routing key) keeps a row on
        one replica; ``priority``: the engine schedules lower first (``URGENT``)."""
        ...


class RetrieverClient(Protocol):
    """The retriever as the stages see it."""

    async def search(self, queries: Sequence[str], k: int) -> list[list[dict]]:
        """Top-k passages per query (id, title, text, retrieval_score), best first."""
        ...


class ServiceUnavailable(RuntimeError):
    """A service call kept failing on dead or restarting replicas past its retry budget: the
    batch fails (no row is written as an error) and a rerun resumes the job."""


def retryable(exc: BaseException) -> bool:
    """Whether a failed call should be retried: a dead or replaced replica, a dead engine, a
    deployment not (yet) available, or back pressure."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    from .engine import EngineUnavailable

    return isinstance(exc, (EngineUnavailable, RayActorError, BackPressureError, DeploymentUnavailableError,
                            ReplicaUnavailableError, asyncio.TimeoutError, TimeoutError))


async def call_with_retries(call, service: str, svc: ServiceConfig):
    """``await call()`` with up to ``svc.request_retries`` retries on retryable failures,
    waiting ``svc.retry_backoff_s``, then twice as long each time (at most 30 s); each try is
    bounded by ``svc.request_timeout_s``."""
    delay, last = svc.retry_backoff_s, None
    for attempt in range(svc.request_retries + 1):
        try:
            return await asyncio.wait_for(call(), timeout=svc.request_timeout_s)
        except Exception as exc:  # noqa: BLE001 - sorted below
            if not retryable(exc):
                raise
            last = exc
            if attempt < svc.request_retries:  # a timeout's message is empty
                log.warning("%s call failed (%s: %s); retry %d of %d in %.0f s", service, type(exc).__name__,
                            (str(exc).splitlines() or [""])[0][:200], attempt + 1, svc.request_retries, delay)
        if attempt < svc.request_retries:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
    raise ServiceUnavailable(f"the {service} service failed {svc.request_retries + 1} times on unavailable "
                             f"replicas (last: {type(last).__name__}: {last}); rerun the job to resume")


class InFlightWindow:
    """Late binding of engine requests: at most ``per_replica`` prompts in flight per engine
    replica (``replicas()``: how many there are, None while unknown), the rest waiting here,
    by priority and then in arrival order; ``URGENT`` requests never wait. A request that the
    router places only when it leaves here cannot be stuck behind a queue that another replica
    would have run sooner: at 8 simulated replicas, with every request sent at once, replicas
    held 300 to 500 prompts each, unevenly, and the run's last 3 s ran on 1 to 3 of them."""

    def __init__(self, per_replica: int | None, replicas: Callable[[], int | None]):
        self.per_replica, self.replicas = per_replica, replicas
        self.in_flight = 0  # prompts admitted and not yet answered
        self._waiting: list[tuple[int, int, int, asyncio.Future]] = []  # heap: (priority, arrival, prompts, turn)
        self._arrivals = itertools.count()

    def limit(self) -> float:
        """Prompts allowed in flight now (infinite without a limit or a replica count)."""
        replicas = self.replicas() if self.per_replica else None
        return replicas * self.per_replica if replicas else math.inf

    async def admit(self, prompts: int, priority: int = 0) -> None:
        """Wait until ``prompts`` more fit (at once for ``URGENT``, or when nothing is in flight);
        each ``admit`` is matched by one ``release`` of the same ``prompts``."""
        if priority <= URGENT:
            self.in_flight += prompts
            return
        turn = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._arrivals), prompts, turn))
        self._admit_waiting()  # the replica count may have grown since the last release
        try:
            await turn
        except asyncio.CancelledError:
            if not turn.cancelled():  # admitted just as the call was cancelled
                self.release(prompts)
            raise  # else it stays in the heap, cancelled, until it comes first

    def release(self, prompts: int) -> None:
        """``prompts`` answered (or failed): the next waiting requests that fit go."""
        self.in_flight -= prompts
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        while self._waiting and (self._waiting[0][3].done() or self._fits(self._waiting[0][2])):
            _, _, prompts, turn = heapq.heappop(self._waiting)
            if not turn.done():  # else cancelled while it waited
                self.in_flight += prompts
                turn.set_result(None)

    def _fits(self, prompts: int) -> bool:
        return self.in_flight == 0 or self.in_flight + prompts <= self.limit()


#: The in-flight window of each engine application's clients in this process.
WINDOWS: dict[str, InFlightWindow] = {}


class ServeEngineClient:
    """``EngineClient`` over the engine deployment's handle; ``calls``: the requests answered.

    A call of more than ``max_prompts`` prompts goes as several requests of at most that many
    (sent together, with the same routing key; a row's prompts may then be split between two):
    the router balances requests, and one request of a batch's 160 critique prompts to a
    replica that runs 16 at a time left the others idle at the start of a run. With
    ``max_prompts`` and ``batches_per_replica``, this process keeps at most ``max_prompts x
    batches_per_replica`` prompts per replica in flight (``InFlightWindow``, one per application
    and process: a chain actor's stages share it, with one config); ``replicas``: the count to
    assume until the router has seen the replicas."""

    def __init__(self, app_name: str, svc: ServiceConfig, max_prompts: int | None = None,
                 batches_per_replica: int | None = None, replicas: int | None = None):
        from ray import serve

        from ..runtime.metrics_actor import job_actor_name

        # options() starts the handle's router now, in the actor's start-up: it learns the
        # replicas before the first batch comes, not while that batch waits (on Serve's router
        # thread, its default: RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 would need a running loop)
        self.handle = serve.get_app_handle(app_name).options()
        self.svc = svc
        self.metrics = job_actor_name()  # where the replicas report what they serve for this job
        self.max_prompts = max_prompts
        per_replica = max_prompts * batches_per_replica if max_prompts and batches_per_replica else None
        if app_name not in WINDOWS:
            WINDOWS[app_name] = InFlightWindow(per_replica, lambda: ROUTED_REPLICAS.get(app_name, replicas))
        self.window = WINDOWS[app_name]
        self.calls = 0

    async def generate(self, prompts, max_tokens, route, stop_ids=(), priority=0):
        if not prompts:
            return []
        size = self.max_prompts or len(prompts)
        parts = [asyncio.ensure_future(self._request(prompts[i:i + size], max_tokens[i:i + size], route, stop_ids,
                                                     priority))
                 for i in range(0, len(prompts), size)]
        try:
            done = await asyncio.gather(*parts)
        except BaseException:  # one part failed or the call was cancelled: the other parts stop too
            for part in parts:
                part.cancel()
            raise
        return [out for part in done for out in part]

    async def _request(self, prompts, max_tokens, route, stop_ids, priority) -> list:
        request = {ROUTE: route, "prompts": [list(p) for p in prompts], "max_tokens": list(max_tokens),
                   "stop_ids": list(stop_ids), "priority": priority, "metrics": self.metrics}
        await self.window.admit(len(prompts), priority)
        try:  # a request being retried keeps its room: the replica it waits for will take it
            out = await call_with_retries(lambda: self.handle.generate.remote(request), "engine", self.svc)
        finally:
            self.window.release(len(prompts))
        if len(out) != len(prompts):
            raise RuntimeError(f"the engine answered {len(out)} of {len(prompts)} prompts")
        self.calls += 1
        return out


class ServeRetrieverClient:
    """``RetrieverClient`` over the retrieval deployment's handle; ``calls``: the calls answered."""

    def __init__(self, app_name: str, svc: ServiceConfig):
        from ray import serve

        from ..runtime.metrics_actor import job_actor_name

        self.handle = serve.get_app_handle(app_name).options()  # its router starts now (ServeEngineClient)
        self.svc = svc
        self.metrics = job_actor_name()
        self.calls = 0

    async def search(self, queries, k):
        if not queries:
            return []
        out = await call_with_retries(lambda: self.handle.search.remote(list(queries), k, self.metrics),
                                      "retriever", self.svc)
        self.calls += 1
        return out
