"""An annotation run in the driver's own process, without Ray (``runner``).

The same stages (their logic, contracts and reports), the same writer and the same replica
classes as the Ray run, with none of its fixed cost: no Ray start, no actors, no Serve, no
second engine process. The engine (vLLM's ``LLMEngine`` in this process,
``services.in_process_engine``) and the retriever load on threads of their own
(``services.in_process``) while the first shard is prepared; then batches run through the
chain (first pass, retrieve, critique) as tasks on one event loop, as many rows in flight as
the Ray stages would hold, and the writer commits each shard as its last row arrives. A small
job on one machine then costs little more than the bare engine; a cluster, several engine
replicas, tensor parallelism or running services need Ray.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable

import pyarrow as pa

from ..infra.config import Config
from ..stages.chain import run_chain, stage_kinds
from .runner import rows_in_flight

log = logging.getLogger(__name__)


def execute_in_process(cfg: Config, plan, todo: dict[str, int], run_id: str, on_shard: Callable[[dict], None],
                       totals) -> dict:
    """Annotate the shards ``todo`` (shard -> rows) of ``plan`` in this process, reporting to
    ``totals`` (a ``MetricsTotals``); ``on_shard`` gets each written shard's summary. Returns
    the stage metrics."""
    from ..model.tokenizer import spec_tokens, tokenizer_spec
    from ..runtime.metrics_actor import Reporter
    from ..services.in_process import InProcessEngineClient, InProcessRetrieverClient
    from .stage_metrics import stage_metrics

    start = plan.timeline_origin = time.time()
    tokenizer = tokenizer_spec(plan.storage, cfg.engine.model)
    retrieval = cfg.selfrag.mode != "never"
    engine = retriever = None
    try:
        engine, retriever = start_replicas(cfg, tokenizer, retrieval, totals)
        tokens, ids, decode = spec_tokens(plan.storage, tokenizer)
        # clients of their own per stage, as in a stage actor: each counts the calls its stage made
        chain = [kind.in_process(kind.logic(cfg, tokens, ids, decode, InProcessEngineClient(engine),
                                            InProcessRetrieverClient(retriever) if retriever else None),
                                 Reporter(kind.logic.name, totals)) for kind in stage_kinds(cfg)]
        run_batches(cfg, plan, todo, run_id, tokenizer, chain, on_shard, [engine, retriever], totals)
    finally:
        close_replicas([engine, retriever])
    return stage_metrics(totals.get(), start)


def close_replicas(replicas: list) -> None:
    """Close each replica (None: none), whatever the others do: a failure to close is logged,
    never raised over the run's own outcome."""
    for replica in replicas:
        if replica is not None:
            try:
                replica.close()
            except Exception:  # noqa: BLE001 - the run's outcome is decided; this is cleanup
                log.warning("the in-process %s did not shut down cleanly", replica.name, exc_info=True)


def run_batches(cfg: Config, plan, todo: dict[str, int], run_id: str, tokenizer, chain: list,
                on_shard: Callable[[dict], None], replicas: list = (), totals=None) -> None:
    """Prepare the shards ``todo`` and run their batches through ``chain`` (stages whose clients
    call in-process ``replicas``, or the running services of a Ray job) into the run's writer,
    on one event loop in this thread; reports go to ``totals`` (None: the job's metrics actor)."""
    from ..runtime import phase_times
    from ..runtime.metrics_actor import Reporter
    from ..stages.contract import check_chain
    from ..stages.write import ShardWriter
    from .dataflow import stage_contracts

    check_chain({f.name: f.type for f in plan.schema}, stage_contracts(cfg, plan.schema))  # as the Ray dataflow does
    writer = ShardWriter(cfg, todo, plan.annotation_hash, plan.versions, plan.identity)
    writer.reporter = Reporter("write", totals)
    prepared = (prepare(cfg, plan, shard, run_id, tokenizer, totals) for shard in todo)
    asyncio.run(annotate(prepared, chain, writer, *rows_in_flight(cfg), on_shard, list(replicas)))
    phase_times.mark("committed")


def start_replicas(cfg: Config, tokenizer, retrieval: bool, totals):
    """The engine replica (vLLM's engine in this process, or the simulated one when
    ``engine.simulated.recording`` is set) and, when ``retrieval``, the retrieval replica, each
    starting on its own thread."""
    from ..infra.console import say
    from ..output.run_log import quiet, quiet_libraries
    from ..services.in_process import InProcessReplica
    from ..services.in_process_engine import InProcessEngineReplica
    from ..services.retriever import RetrieverReplica
    from ..services.simulated_engine import SimulatedEngineReplica

    say(f"starting the engine ({cfg.engine.model}, in this process)" + (" and the retriever" if retrieval else "")
        + " ...")
    os.environ.update(cfg.engine.env)  # what a replica's runtime environment would set
    if quiet():  # vLLM's lines go to the run log, as a replica's do
        from transformers.utils import logging as transformers_logging

        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        quiet_libraries()  # a vLLM imported before has its console handler already
        transformers_logging.disable_progress_bar()  # the encoder's "Loading weights" bar
    body = SimulatedEngineReplica if cfg.engine.simulated.recording else InProcessEngineReplica
    e, r = cfg.engine.service, cfg.retrieval.service
    engine = InProcessReplica("engine", body, cfg.engine, cfg.storage, tokenizer, cfg.debug.record_engine_requests,
                              totals, request_timeout_s=e.request_timeout_s, start_timeout_s=e.start_timeout_s)
    retriever = InProcessReplica("retriever", RetrieverReplica, cfg.retrieval, cfg.storage, None, totals,
                                 request_timeout_s=r.request_timeout_s, start_timeout_s=r.start_timeout_s) \
        if retrieval else None
    return engine, retriever


def prepare(cfg: Config, plan, shard: str, run_id: str, tokenizer, totals=None) -> pa.Table:
    """The rows of ``shard`` still to annotate, prepared (always mode: all marked for retrieval)."""
    from ..runtime.metrics_actor import Reporter
    from ..stages.prepare import rows_to_annotate
    from .dataflow import mark_all_for_retrieval

    with Reporter("prepare", totals).batch(1):
        rows = rows_to_annotate(shard, cfg.input, cfg.selfrag, plan.output, cfg.engine.model, run_id, plan.schema,
                                tokenizer, plan.annotation_hash)
    return mark_all_for_retrieval(rows, cfg) if cfg.selfrag.mode == "always" else rows


async def started_replicas(replicas: list) -> None:
    """Wait until the ``replicas`` (None: not used) are built; ServicesUnavailable if one failed."""
    from ..services.deploy import ServicesUnavailable

    for replica in replicas:
        if replica is not None:
            try:
                await asyncio.wait_for(replica.built(), replica.start_timeout_s)
            except asyncio.TimeoutError:
                raise ServicesUnavailable(f"the {replica.name} did not start within {replica.start_timeout_s:g} s "
                                          "(start_timeout_s)") from None
            except Exception as exc:  # noqa: BLE001 - any failure to start is the service's
                raise ServicesUnavailable(f"the {replica.name} failed to start: {type(exc).__name__}: {exc}") from exc


async def annotate(prepared, chain: list, writer, batch_rows: int, in_flight: int,
                   on_shard: Callable[[dict], None], replicas: list) -> None:
    """Run every batch of the ``prepared`` tables through ``chain`` (at most ``in_flight`` at
    once) and into ``writer``, in the order they finish; ``on_shard`` gets each written shard's
    summary. The first shard is prepared while the ``replicas`` start; one that failed to start
    fails the run before any batch. A failed batch (or ``on_shard`` raising) fails the run: the
    batches in flight are cancelled, the rows staged are kept."""
    async def one(batch: pa.Table) -> None:
        for summary in writer(await run_chain(chain, batch)).to_pylist():
            on_shard(summary)

    async def settle(limit: int) -> None:  # until fewer than ``limit`` batches are in flight
        nonlocal pending
        while len(pending) >= max(limit, 1):
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failures = [task.exception() for task in done if task.exception() is not None]  # each read once
            if failures:
                raise failures[0]  # the first failure is the run's

    pending: set[asyncio.Task] = set()
    started = False
    try:
        for table in prepared:
            if not started:
                await started_replicas(replicas)
                started = True
            for offset in range(0, table.num_rows, batch_rows):
                await settle(in_flight)
                pending.add(asyncio.ensure_future(one(table.slice(offset, batch_rows))))
        await settle(1)
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
