"""The engine service: the Self-RAG model as a Ray Serve deployment of asynchronous vLLM engines.

One replica holds one ``AsyncLLM`` (continuous batching over every request in flight, from any
stage) and is called through a deployment handle with token-id prompts. A call carries the
prompts of one row (its routing key), so they land on one replica and share its prefix cache.
Each prompt is its own vLLM request: one that fails (e.g. too long) is returned as an error
string and costs nothing else. A dead engine core raises ``EngineUnavailable`` for the whole
call and fails the replica's health check, so Serve replaces the replica while callers retry.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Sequence

from ..infra.config import EngineConfig, StorageConfig
from ..selfrag.scoring import Continuation
from ..model.tokenizer import TokenizerSpec
from .reporting import ReportingReplica

log = logging.getLogger(__name__)

class EngineUnavailable(RuntimeError):
    """The replica's engine is dead (or starting): retry the call, on this or another replica."""


class EngineCounters:
    """A vLLM stat logger that keeps running totals: prefix-cache queries and hits (tokens),
    generated tokens, finished requests, and per scheduler step the requests running and waiting
    (vLLM's own scheduler and iteration statistics)."""

    def __init__(self):
        self.totals = {"prefix_cache_queries": 0, "prefix_cache_hits": 0, "generated_tokens": 0,
                       "prompt_tokens": 0, "requests": 0, "steps": 0, "running_sum": 0, "waiting_sum": 0}

    def factory(self, vllm_config, engine_index: int = 0):
        """A ``StatLoggerFactory`` whose loggers add into these totals."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        totals = self.totals

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    totals["steps"] += 1
                    totals["running_sum"] += scheduler_stats.num_running_reqs
                    totals["waiting_sum"] += scheduler_stats.num_waiting_reqs
                    if scheduler_stats.prefix_cache_stats is not None:
                        totals["prefix_cache_queries"] += scheduler_stats.prefix_cache_stats.queries
                        totals["prefix_cache_hits"] += scheduler_stats.prefix_cache_stats.hits
                if iteration_stats is not None:
                    totals["generated_tokens"] += iteration_stats.num_generation_tokens
                    totals["prompt_tokens"] += iteration_stats.num_prompt_tokens
                    totals["requests"] += len(iteration_stats.finished_requests)

            def log_engine_initialized(self):
                pass

        return _Logger(vllm_config, engine_index)


class EngineReplica(ReportingReplica):
    """Serve deployment body: one asynchronous vLLM engine (see the module docstring)."""

    async def __init__(self, cfg: EngineConfig, storage: StorageConfig, tokenizer: TokenizerSpec,
                       record_requests: str | None = None, metrics: str | None = None):
        from ..infra.io import Storage
        from ..model.vllm_engine import engine_kwargs
        from ..model.tokenizer import spec_tokens

        start = time.perf_counter()
        self.announce("engine", metrics)
        self.cfg, storage = cfg, Storage(storage)
        _, self.ids, self.decode = spec_tokens(storage, tokenizer)
        self._reflection = frozenset(self.ids.all_ids)
        self.counters = EngineCounters()
        self.engine = self.start_engine(storage.localize(cfg.model), engine_kwargs(cfg))
        self.start_reporting(self.counters.totals, time.perf_counter() - start, record_requests)

    def start_engine(self, model: str, kwargs: dict):
        """The vLLM engine of this replica: an ``AsyncLLM`` (its engine core in a process of its own)."""
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=model, disable_log_stats=True, **kwargs)
        return AsyncLLM.from_engine_args(args, stat_loggers=[self.counters.factory])

    def dead(self) -> bool:
        """Whether the engine died (the replica cannot serve any more)."""
        return self.engine.errored

    async def generate(self, request: dict) -> list[Continuation | str]:
        """Greedy continuations of ``request["prompts"]`` (token ids), each with its budget in
        ``request["max_tokens"]`` and stopping after ``request["stop_ids"]``: one Continuation per
        prompt, or an error string for a prompt vLLM refused; ``request["priority"]`` (default 0)
        orders them in vLLM's queue (``scheduling_policy: priority``: lower first). ``request["route"]``
        (the rows' routing key) is read by the router only."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.dead():
            raise EngineUnavailable("the vLLM engine of this replica is dead; the replica is being replaced")
        prompts, budgets, stop_ids = request["prompts"], request["max_tokens"], request.get("stop_ids", ())
        self.begin(request.get("metrics"))
        priority = int(request.get("priority", 0))
        outs = await asyncio.gather(*(self._one(p, b, stop_ids, priority) for p, b in zip(prompts, budgets)),
                                    return_exceptions=True)
        self.end()
        if any(isinstance(o, EngineDeadError) for o in outs) or self.dead():
            raise EngineUnavailable("the vLLM engine of this replica died; the replica is being replaced")
        outs = [f"{type(o).__name__}: {o}" if isinstance(o, BaseException) else o for o in outs]
        self.record(prompts, budgets, stop_ids, outs)
        return outs

    async def _one(self, prompt_ids: Sequence[int], max_tokens: int, stop_ids: Sequence[int],
                   priority: int = 0) -> Continuation:
        from vllm.inputs import TokensPrompt

        from ..model.vllm_engine import sampling_params, to_continuation

        params = sampling_params(self.ids, max_tokens, stop_ids, final_only=True, detokenize=False)
        final = None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), params,
                                              request_id=uuid.uuid4().hex, priority=priority):
            final = out
        return to_continuation(final.outputs[0], self._reflection, self.decode)

    async def check_health(self) -> None:
        """Serve's health check: a replica whose engine died is replaced."""
        if self.dead():
            raise EngineUnavailable("the vLLM engine of this replica is dead")

    def close(self) -> None:
        """The last report, then the engine's shutdown (once)."""
        self.stop_reporting()
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown()

    def __del__(self):
        self.close()
