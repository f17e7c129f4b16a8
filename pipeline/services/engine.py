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
import json
import logging
import os
import time
import uuid
from typing import Sequence

from ..config import EngineConfig, StorageConfig
from ..selfrag.scoring import Continuation
from ..tokenizer import TokenizerSpec

log = logging.getLogger(__name__)

#: How often a replica reports its counters to the job's metrics actor, in seconds.
REPORT_EVERY_S = 2.0


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


class EngineReplica:
    """Serve deployment body: one asynchronous vLLM engine (see the module docstring)."""

    async def __init__(self, cfg: EngineConfig, storage: StorageConfig, tokenizer: TokenizerSpec,
                       record_requests: str | None = None):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from .. import io
        from ..engine import engine_kwargs
        from ..metrics import Reporter
        from ..tokenizer import spec_tokens

        start = time.perf_counter()
        io.configure(storage)
        self.cfg = cfg
        _, self.ids, self.decode = spec_tokens(tokenizer)
        self._reflection = frozenset(self.ids.all_ids)
        self.counters = EngineCounters()
        args = AsyncEngineArgs(model=io.localize(cfg.model), disable_log_stats=True, **engine_kwargs(cfg))
        self.engine = AsyncLLM.from_engine_args(args, stat_loggers=[self.counters.factory])
        self.reporter = Reporter("engine", refresh=True)
        self.reporter.report(init_seconds=time.perf_counter() - start, startups=1, ready_at=time.time())
        self._reported = dict(self.counters.totals)
        self._window: dict[str, float] = {}  # first request start, last request end (epoch seconds)
        self._record = None
        if record_requests:
            os.makedirs(record_requests, exist_ok=True)
            self._record = open(os.path.join(record_requests, f"requests-{uuid.uuid4().hex}.jsonl"), "a")
        self._report_task = asyncio.get_running_loop().create_task(self._report_loop())

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            self.flush_counters()

    def flush_counters(self, wait: bool = False) -> None:
        """Send the counters' growth since the last report to the metrics actor (``wait``: until
        it has them)."""
        now = dict(self.counters.totals)
        delta = {k: now[k] - self._reported.get(k, 0) for k in now}
        if any(delta.values()):
            self.reporter.report(wait=wait, **delta, **self._window)
            self._reported = now
        if self._record is not None:
            self._record.flush()

    async def generate(self, request: dict) -> list[Continuation | str]:
        """Greedy continuations of ``request["prompts"]`` (token ids), each with its budget in
        ``request["max_tokens"]`` and stopping after ``request["stop_ids"]``: one Continuation per
        prompt, or an error string for a prompt vLLM refused. ``request["route"]`` (the row id)
        is read by the router only."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.engine.errored:
            raise EngineUnavailable("the vLLM engine of this replica is dead; the replica is being replaced")
        prompts, budgets, stop_ids = request["prompts"], request["max_tokens"], request.get("stop_ids", ())
        self._window.setdefault("first_start", time.time())
        if self._record is not None:
            for p, b in zip(prompts, budgets):
                self._record.write(json.dumps({"prompt": p, "max_tokens": b, "stop_ids": list(stop_ids)}) + "\n")
        outs = await asyncio.gather(*(self._one(p, b, stop_ids) for p, b in zip(prompts, budgets)),
                                    return_exceptions=True)
        self._window["last_end"] = time.time()
        if any(isinstance(o, EngineDeadError) for o in outs) or self.engine.errored:
            raise EngineUnavailable("the vLLM engine of this replica died; the replica is being replaced")
        return [f"{type(o).__name__}: {o}" if isinstance(o, BaseException) else o for o in outs]

    async def _one(self, prompt_ids: Sequence[int], max_tokens: int, stop_ids: Sequence[int]) -> Continuation:
        from vllm.inputs import TokensPrompt

        from ..engine import sampling_params, to_continuation

        params = sampling_params(self.ids, max_tokens, stop_ids, final_only=True, detokenize=False)
        final = None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), params,
                                              request_id=uuid.uuid4().hex):
            final = out
        return to_continuation(final.outputs[0], self._reflection, self.decode)

    async def check_health(self) -> None:
        """Serve's health check: a replica whose engine died is replaced."""
        if self.engine.errored:
            raise EngineUnavailable("the vLLM engine of this replica is dead")

    def __del__(self):
        task = getattr(self, "_report_task", None)
        if task is not None:
            task.cancel()
            self.flush_counters(wait=True)  # the job deletes its services, then reads the metrics
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
