"""What the stages call: the engine and the retriever, behind small asynchronous interfaces.

``EngineClient.generate`` and ``RetrieverClient.search`` are all the stage logic knows of the
models, so the stages can be tested with fakes (``tests/fakes.py``) in seconds. The Serve
clients here send each call through a deployment handle and retry a call that failed because
a replica died or its engine is being replaced (bounded by ``retries`` and ``timeout_s``);
any other failure is the caller's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol, Sequence

from ..infra.config import ServiceConfig
from ..selfrag.scoring import Continuation

log = logging.getLogger(__name__)

#: Key of the routing key (``stages.common.route_key``) in an engine request; read by
#: ``routing.RowAffinityRouter``.
ROUTE = "route"
#: Engine priority of a long-form tree's requests (lower first; every other request has 0): a
#: tree generates a segment per depth, one after another, and a tree whose requests queued behind
#: short-form ones at each depth ended the run alone (8 simulated replicas: 0.84 busy, 0.86 to
#: 0.90 with trees first). vLLM honours it with ``scheduling_policy: priority`` (``vllm_engine.engine_kwargs``).
URGENT = -1


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


class ServeEngineClient:
    """``EngineClient`` over the engine deployment's handle; ``calls``: the requests answered.

    A call of more than ``max_prompts`` prompts goes as several requests of at most that many
    (sent together, with the same routing key; a row's prompts may then be split between two):
    the router balances requests, and one request of a batch's 160 critique prompts to a
    replica that runs 16 at a time left the others idle at the start of a run."""

    def __init__(self, app_name: str, svc: ServiceConfig, max_prompts: int | None = None):
        from ray import serve

        from ..runtime.metrics_actor import job_actor_name

        self.handle = serve.get_app_handle(app_name)
        self.svc = svc
        self.metrics = job_actor_name()  # where the replicas report what they serve for this job
        self.max_prompts = max_prompts
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
        out = await call_with_retries(lambda: self.handle.generate.remote(request), "engine", self.svc)
        if len(out) != len(prompts):
            raise RuntimeError(f"the engine answered {len(out)} of {len(prompts)} prompts")
        self.calls += 1
        return out


class ServeRetrieverClient:
    """``RetrieverClient`` over the retrieval deployment's handle; ``calls``: the calls answered."""

    def __init__(self, app_name: str, svc: ServiceConfig):
        from ray import serve

        from ..runtime.metrics_actor import job_actor_name

        self.handle = serve.get_app_handle(app_name)
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
