"""Shared by the service stages: per-row task and budget, fault isolation, and the thin Ray Data
actor that runs a stage's logic against the services.

A stage's logic is a plain class (``FirstPass``, ``Retrieve``, ``Critique``) built from the
config, the prompt builder and the service clients, with an ``async process(view)``; it never
imports Ray or vLLM, so tests drive it with fakes. ``ServiceStage`` wraps it for
``map_batches``: it builds the real clients from deployment handles, enforces the stage's
contract on each batch, reports metrics, and keeps several batches in flight (async ``__call__``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import defaultdict
from typing import Awaitable, Callable, Sequence, TypeVar

import pyarrow as pa

from ..infra.config import Config, stage_pools
from ..selfrag.prompts import CLOSED_SET_TASKS, PromptTokens
from ..selfrag.tokens import ReflectionIds
from .columns import OFFSET, SHARD
from .contract import Contract

log = logging.getLogger(__name__)
T = TypeVar("T")


def effective_task(task: str | None, cfg: Config) -> str | None:
    """The row's task, or the configured default when the row has none."""
    return task if task is not None else cfg.input.default_task


def max_new_tokens(task: str | None, cfg: Config) -> int:
    """New-token budget: closed-set tasks get ``max_new_tokens_closed``."""
    closed = effective_task(task, cfg) in CLOSED_SET_TASKS
    return cfg.selfrag.max_new_tokens_closed if closed else cfg.selfrag.max_new_tokens


def rows_per_route(cfg: Config) -> int | None:
    """How many consecutive rows of a shard share a routing key: the first model pool's batch
    size, so that a batch makes one or two engine calls per phase (with a key per row hashed
    into buckets, a batch of 32 rows made about 20 calls of one or two prompts over 8 replicas,
    and the router's work held the engine back at the start of a run). None, one key for every
    row, for a single replica that the job deploys."""
    svc = cfg.engine.service
    if max(svc.replicas, svc.max_replicas or 0) == 1 and not svc.deployment:
        return None
    return stage_pools(cfg)[0][1].batch_size


def engine_request_prompts(cfg: Config) -> int | None:
    """Most prompts in one engine request: one replica's batch (``replica_batch``), so that the
    router can spread a large call over the replicas; None (no limit) for a single replica
    that the job deploys."""
    from ..services.deploy import replica_batch

    return None if rows_per_route(cfg) is None else replica_batch(cfg)


def engine_batches_per_replica(cfg: Config) -> int | None:
    """Replica batches a stage actor keeps in flight per engine replica
    (``engine.batches_in_flight_per_replica``); None (no limit) for an autoscaled service:
    Serve's autoscaling counts the requests at the replicas and their handles, not those held
    back, and would see too little demand."""
    svc = cfg.engine.service
    autoscaled = svc.min_replicas is not None and svc.max_replicas is not None
    return None if autoscaled else cfg.engine.batches_in_flight_per_replica


def route_key(shard: str, offset: int, rows: int | None) -> str:
    """The routing key of the row at ``offset`` in ``shard``: a hash of the shard and its group
    of ``rows`` consecutive rows (``rows_per_route``). All of a row's engine requests (first
    pass, critique, long-form) carry it, so they reach one replica and share its prefix cache,
    also where the stages run in separate pools whose batches differ."""
    if rows is None:
        return "all"
    return "g" + hashlib.blake2b(f"{shard}\0{offset // rows}".encode(), digest_size=8).hexdigest()


def route_keys(view, cfg: Config) -> list[str]:
    """The routing key of each row of a batch (``view`` reads its shard and offset columns)."""
    rows = rows_per_route(cfg)
    return [route_key(shard, offset, rows) for shard, offset in zip(view[SHARD], view[OFFSET])]


def by_route(keys: Sequence[str], rows: Sequence[int]) -> dict[str, list[int]]:
    """``rows`` (indices into ``keys``, the batch's routing keys) grouped by routing key."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i in rows:
        groups[keys[i]].append(i)
    return dict(groups)


async def run_isolated(fn: Callable[[Sequence], Awaitable[list[T]]], items: Sequence,
                       fatal: tuple[type[BaseException], ...] = ()) -> list[T | Exception]:
    """``await fn(items)``; if that fails, each half in turn (down to single items), so one bad
    item costs only its own result (returned as the exception), never the batch, in about
    2 log2(n) calls. A ``fatal`` exception (a service gone for good) is no item's fault: it is
    raised, and the batch fails."""
    if not items:
        return []
    try:
        return list(await fn(items))
    except fatal:
        raise
    except Exception as exc:  # noqa: BLE001 - any other failure is narrowed down to its items
        if len(items) <= 1:
            return [exc] * len(items)
        log.warning("batch of %d failed (%s); retrying it in halves", len(items), exc)
    mid = len(items) // 2
    return await run_isolated(fn, items[:mid], fatal) + await run_isolated(fn, items[mid:], fatal)


class StageLogic:
    """What a stage does to a batch; subclasses set ``name`` and implement ``contract`` and ``process``."""

    name = "stage"

    def __init__(self, cfg: Config, tokens: PromptTokens, ids: ReflectionIds, decode: Callable[[Sequence[int]], str],
                 engine=None, retriever=None):
        self.cfg, self.tokens, self.ids, self.decode = cfg, tokens, ids, decode
        self.engine, self.retriever = engine, retriever

    @staticmethod
    def contract(cfg: Config) -> Contract:
        raise NotImplementedError

    async def process(self, view) -> dict:
        """Read the batch through ``view``, ``view.set`` the stage's output columns, and return
        counters for the stage's metrics (several batches may be in process at once)."""
        raise NotImplementedError


class InFlightLimit:
    """At most ``limit`` batches in process at once in one Ray Data actor (None: no limit).

    Ray Data calls an actor's async ``__call__`` for up to ``max_concurrent_calls_per_actor``
    tasks at once, and for several batches of each task (``dataflow.allow_batches_in_flight``),
    all on one event loop; this holds the actor to the stage's ``max_concurrent_batches``."""

    def __init__(self, limit: int | None):
        self._slots = asyncio.Semaphore(limit) if limit else None

    @contextlib.asynccontextmanager
    async def slot(self):
        """Hold one of the slots while the block runs (wait for one first)."""
        if self._slots is None:
            yield
            return
        async with self._slots:
            yield


class ServiceStage:
    """Callable class for ``map_batches``: one stage's logic against the engine and retrieval
    services (subclasses set ``logic``)."""

    logic: type[StageLogic] = StageLogic

    def __init__(self, cfg: Config, tokenizer, engine_app: str | None, retriever_app: str | None,
                 batches_in_flight: int | None = None):
        """``tokenizer``: the model's ``TokenizerSpec``; the apps: the services' Serve applications;
        ``batches_in_flight``: at most that many batches in process at once (None: no limit)."""
        from ..runtime.metrics_actor import Reporter
        from ..services.clients import ServeEngineClient, ServeRetrieverClient
        from ..infra.io import Storage
        from ..model.tokenizer import spec_tokens

        start = time.perf_counter()
        tokens, ids, decode = spec_tokens(Storage(cfg.storage), tokenizer)
        svc = cfg.engine.service
        replicas = None if svc.deployment else svc.replicas  # until the router has seen them
        engine = ServeEngineClient(engine_app, svc, engine_request_prompts(cfg), engine_batches_per_replica(cfg),
                                   replicas) if engine_app else None
        retriever = ServeRetrieverClient(retriever_app, cfg.retrieval.service) if retriever_app else None
        self._set_up(self.logic(cfg, tokens, ids, decode, engine, retriever), Reporter(self.logic.name))
        self.in_flight = InFlightLimit(batches_in_flight)
        self.reporter.report(init_seconds=time.perf_counter() - start)

    @classmethod
    def in_process(cls, stage: StageLogic, reporter) -> "ServiceStage":
        """The stage around ``stage`` (its logic, built with in-process clients), reporting to
        ``reporter``: a run in one process (``pipeline.run.in_process``)."""
        wrapped = cls.__new__(cls)
        wrapped._set_up(stage, reporter)
        wrapped.in_flight = InFlightLimit(None)  # the run holds its batches in flight itself
        return wrapped

    def _set_up(self, stage: StageLogic, reporter) -> None:
        self.stage, self.reporter = stage, reporter
        self.contract = self.logic.contract(stage.cfg)
        self.clients = {"engine_calls": stage.engine, "retriever_calls": stage.retriever}
        self.calls_reported = dict.fromkeys(self.clients, 0)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        async with self.in_flight.slot():
            view = self.contract.view(batch)
            with self.reporter.batch(batch.num_rows) as extra:
                extra.update(await self.stage.process(view))
                extra.update(self.calls_since_last_report())
            return view.result()

    def calls_since_last_report(self) -> dict:
        """The service calls answered since the last batch's report (``engine_calls``,
        ``retriever_calls``): a job reusing running services waits until their replicas have
        reported as many (``pipeline.run.stage_metrics.await_service_reports``)."""
        now = {key: client.calls for key, client in self.clients.items() if client is not None}
        grown = {key: n - self.calls_reported[key] for key, n in now.items() if n > self.calls_reported[key]}
        self.calls_reported.update(now)
        return grown
