"""Helpers shared by the engine stages: per-row task, token budget, and fault isolation."""

from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar

from ..config import Config
from ..selfrag.prompts import CLOSED_SET_TASKS

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
    """Run ``fn`` on all items at once; if that fails, item by item, so one bad item costs
    only its own result (returned as the exception) and never the batch."""
    try:
        return list(fn(items))
    except Exception as exc:  # noqa: BLE001 - any engine failure falls back to one-by-one
        if len(items) <= 1:
            return [exc] * len(items)
        log.warning("batch of %d failed (%s); retrying one by one", len(items), exc)
    results: list[T | Exception] = []
    for item in items:
        try:
            results.extend(fn([item]))
        except Exception as exc:  # noqa: BLE001
            results.append(exc)
    return results
