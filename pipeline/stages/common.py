"""Shared by the engine stages: per-row task and token budget, fault isolation, the engine-stage base."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable, Sequence, TypeVar

import pyarrow as pa

from .. import io
from ..config import Config
from ..engine import Engine, EngineDead
from ..metrics import Reporter
from ..selfrag.prompts import CLOSED_SET_TASKS
from ..tokenizer import model_prompt_tokens

log = logging.getLogger(__name__)
T = TypeVar("T")


def effective_task(task: str | None, cfg: Config) -> str | None:
    """The row's task, or the configured default when the row has none."""
    return task if task is not None else cfg.input.default_task


def max_new_tokens(task: str | None, cfg: Config) -> int:
    """New-token budget: closed-set tasks get ``max_new_tokens_closed``."""
    closed = effective_task(task, cfg) in CLOSED_SET_TASKS
    return cfg.selfrag.max_new_tokens_closed if closed else cfg.selfrag.max_new_tokens


def run_isolated(fn: Callable[[Sequence], list[T]], items: Sequence) -> list[T | Exception]:
    """Run ``fn`` on all items at once; if that fails, on each half in turn (down to single
    items), so one bad item costs only its own result (returned as the exception), never the
    batch, and finding it takes about 2 log2(n) calls, not n. A dead engine is no item's fault:
    ``EngineDead`` is raised, so the batch fails and no row is written."""
    try:
        return list(fn(items))
    except EngineDead:
        raise
    except Exception as exc:  # noqa: BLE001 - any other failure is narrowed down to its items
        if len(items) <= 1:
            return [exc] * len(items)
        log.warning("batch of %d failed (%s); retrying it in halves", len(items), exc)
    mid = len(items) // 2
    return run_isolated(fn, items[:mid]) + run_isolated(fn, items[mid:])


class EngineStage:
    """Base of the vLLM stages: one engine replica per actor, metrics per batch, clean shutdown.

    Subclasses implement ``process(batch) -> batch``.
    """

    stage = "engine"

    def __init__(self, cfg: Config):
        start = time.perf_counter()
        self.cfg = cfg
        io.configure(cfg.storage)
        engine_cfg = replace(cfg.engine, model=io.localize(cfg.engine.model))  # remote: copied once per node
        self.engine = Engine(engine_cfg, getattr(cfg.stages, self.stage).env)
        self.tokens, self.tokenizer = model_prompt_tokens(cfg.engine.model)
        self.reporter = Reporter(self.stage)
        self.reporter.report(init_seconds=time.perf_counter() - start)

    def process(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        before = self.engine.generated_tokens
        with self.reporter.batch(batch.num_rows) as extra:
            out = self.process(batch)
            extra["generated_tokens"] = self.engine.generated_tokens - before
        return out

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
