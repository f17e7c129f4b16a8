"""A simulated engine service: the real engine's interface and outputs, a GPU's timing, no model.

``SimulatedEngineReplica`` answers each prompt with the continuation a real engine gave it
(recorded with ``debug.record_engine_requests``) and takes the time a latency model gives
(``engine.simulated``): continuous batching of at most ``max_num_seqs`` sequences, one step of
``step_s`` per generated token, and the prefill of the prompt tokens that a prefix cache does
not hold added to the step that admits the prompt. It sleeps, never spins, so one machine can
hold many replicas: the benchmark of scale-out (``jobs.bench_scale``) and orchestration tests
run the whole harness against it.

``BatchSchedule`` and ``PrefixCache`` are the latency model as plain arithmetic;
``predicted_seconds`` runs it without sleeping, to check a replica against it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from dataclasses import dataclass
from typing import Sequence

from ..infra.config import EngineConfig, SimulatedEngineConfig, StorageConfig
from ..model.tokenizer import TokenizerSpec
from .reporting import ReportingReplica
from .engine import EngineCounters
from .recording import output_of, read_records, request_key

#: Tokens per prefix-cache block (vLLM's GPU default).
BLOCK_TOKENS = 16
#: How far the simulated GPU's clock may run ahead of a delayed event loop, in seconds.
MAX_LAG_S = 1.0


class PrefixCache:
    """Which prompt prefixes were prefilled before, in whole blocks (no eviction: a GPU's KV
    cache holds far more than a benchmark's prompts)."""

    def __init__(self, block_tokens: int = BLOCK_TOKENS):
        self.block_tokens = block_tokens
        self._blocks: set[int] = set()

    def uncached(self, prompt: Sequence[int]) -> tuple[int, int]:
        """(tokens to prefill, tokens served from the cache) for ``prompt``; its blocks are cached from now on."""
        hits, chained, n = 0, 0, self.block_tokens
        cached = True
        for end in range(n, len(prompt) + 1, n):
            chained = hash((chained, tuple(prompt[end - n:end])))
            if cached and chained in self._blocks:
                hits += n
            else:
                cached = False
                self._blocks.add(chained)
        return len(prompt) - hits, hits


@dataclass
class ScheduledPrompt:
    """One prompt in the schedule: steps still to run, tokens to prefill, and who waits for it."""

    steps_left: int
    prefill_tokens: int
    waiter: object = None


class BatchSchedule:
    """Continuous batching as arithmetic: ``step()`` admits waiting sequences into free slots
    (the lowest priority value first, then in arrival order, as vLLM's priority scheduling), advances every
    running sequence by one token and says how long that step took."""

    def __init__(self, model: SimulatedEngineConfig):
        self.model = model
        self.waiting: list[tuple[int, int, ScheduledPrompt]] = []  # a heap of (priority, arrival, sequence)
        self.arrivals = itertools.count()
        self.running: list[ScheduledPrompt] = []

    def submit(self, seq: ScheduledPrompt, priority: int = 0) -> None:
        """Queue a sequence (it starts at the next step with a free slot)."""
        heapq.heappush(self.waiting, (priority, next(self.arrivals), seq))

    def busy(self) -> bool:
        """Whether any sequence is running or waiting."""
        return bool(self.running or self.waiting)

    def step(self) -> tuple[float, list[ScheduledPrompt]]:
        """Run one step: (its seconds, the sequences it finished)."""
        prefill = 0
        while self.waiting and len(self.running) < self.model.max_num_seqs:
            seq = heapq.heappop(self.waiting)[-1]
            prefill += seq.prefill_tokens
            self.running.append(seq)
        seconds = self.model.step_s + prefill * self.model.prefill_s_per_1k_tokens / 1000
        finished, still = [], []
        for seq in self.running:
            seq.steps_left -= 1
            (finished if seq.steps_left <= 0 else still).append(seq)
        self.running = still
        return seconds, finished


def predicted_seconds(model: SimulatedEngineConfig, requests: list[tuple[int, int]]) -> float:
    """Seconds the latency model gives for ``requests`` ((generated tokens, tokens to prefill)
    each), all submitted at once, without sleeping."""
    schedule = BatchSchedule(model)
    for steps, prefill in requests:
        schedule.submit(ScheduledPrompt(max(1, steps), prefill))
    total = 0.0
    while schedule.busy():
        total += schedule.step()[0]
    return total


class NotRecorded(LookupError):
    """A prompt the recording has no output for (a different workload, model or setting)."""


class SimulatedEngineReplica(ReportingReplica):
    """Serve deployment body with ``EngineReplica``'s interface (see the module docstring)."""

    async def __init__(self, cfg: EngineConfig, storage: StorageConfig, tokenizer: TokenizerSpec,
                       record_requests: str | None = None, metrics: str | None = None):
        start = time.perf_counter()
        self.announce("engine", metrics)
        self.model = cfg.simulated
        self.outputs = {request_key(r["prompt"], r["max_tokens"], r["stop_ids"]): output_of(r)
                        for r in read_records(cfg.simulated.recording)}
        if not self.outputs:
            raise NotRecorded(f"engine.simulated.recording: no recorded requests under {cfg.simulated.recording!r} "
                              "(record a real run with debug.record_engine_requests)")
        self.cache = PrefixCache()
        self.schedule = BatchSchedule(self.model)
        self.counters = EngineCounters().totals  # the real replica's counters, kept here by hand
        self._wake = asyncio.Event()
        self._stepper = asyncio.get_running_loop().create_task(self._run_steps())
        self.start_reporting(self.counters, time.perf_counter() - start, record_requests)

    async def generate(self, request: dict) -> list:
        """As ``EngineReplica.generate``: the recorded output of each prompt, or an error string
        for a prompt the recording lacks, once the latency model's time has passed."""
        prompts, budgets, stop_ids = request["prompts"], request["max_tokens"], request.get("stop_ids", ())
        priority = int(request.get("priority", 0))
        self.begin(request.get("metrics"))
        loop = asyncio.get_running_loop()
        outs, waits = [], []
        for prompt, budget in zip(prompts, budgets):
            out = self.outputs.get(request_key(prompt, budget, stop_ids))
            if out is None:
                outs.append(f"{NotRecorded.__name__}: no recorded output for this prompt ({len(prompt)} tokens, "
                            f"budget {budget})")
                continue
            outs.append(out)
            if isinstance(out, str):  # the engine refused it at once (e.g. too long)
                continue
            prefill, hits = self.cache.uncached(prompt)
            steps = len(out.token_ids)
            seq = ScheduledPrompt(max(1, steps), prefill, loop.create_future())
            self.schedule.submit(seq, priority)
            waits.append(seq.waiter)
            c = self.counters
            c["prefix_cache_queries"] += len(prompt)
            c["prefix_cache_hits"] += hits
            c["prompt_tokens"] += len(prompt)
            c["generated_tokens"] += steps
            c["requests"] += 1
        self._wake.set()
        await asyncio.gather(*waits)
        self.end()
        self.record(prompts, budgets, stop_ids, outs)
        return outs

    async def _run_steps(self) -> None:
        """The simulated GPU: steps while sequences wait or run, sleeping each step's time."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            if not self.schedule.busy():
                self._wake.clear()
                await self._wake.wait()
                due = loop.time()
            waiting = len(self.schedule.waiting)
            seconds, finished = self.schedule.step()
            self.counters["steps"] += 1
            self.counters["running_sum"] += len(self.schedule.running) + len(finished)
            self.counters["waiting_sum"] += waiting
            # The simulated GPU keeps its own clock: a wake-up this process's CPU delayed is made
            # up by the next steps (up to MAX_LAG_S behind), as a GPU does not slow down when its
            # host's CPU is busy.
            due = max(due + seconds, loop.time() - MAX_LAG_S)
            await asyncio.sleep(max(0.0, due - loop.time()))
            for seq in finished:
                if not seq.waiter.done():
                    seq.waiter.set_result(None)

    async def check_health(self) -> None:
        """Serve's health check: a simulated engine does not die."""

    def close(self) -> None:
        """Stop stepping; the last report."""
        stepper = getattr(self, "_stepper", None)
        if stepper is not None:
            stepper.cancel()
        self.stop_reporting()

    def __del__(self):
        self.close()
