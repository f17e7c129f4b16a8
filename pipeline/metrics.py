"""Per-stage metrics shared across Ray workers through one named actor.

Stages report busy seconds, rows, generated tokens and start-up seconds; the job reads the
totals at the end (they go into the run manifest and the benchmark). Reporting is a no-op
when no metrics actor runs (e.g. a stage used outside the job).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import ray

ACTOR_NAME = "selfrag-stage-metrics"


@ray.remote(num_cpus=0)
class StageMetrics:
    """Sums per stage or service: seconds (busy in batches), rows, batches, generated tokens and
    other counters; the slowest replica's start-up (init_seconds); first batch start, last
    batch end and the first replica ready (epoch seconds)."""

    def __init__(self):
        self.stats: dict[str, dict[str, float]] = {}

    def add(self, stage: str, values: dict) -> None:
        entry = self.stats.setdefault(stage, {})
        for key, value in values.items():
            if key in ("init_seconds", "last_end"):
                entry[key] = max(entry.get(key, value), value)
            elif key in ("first_start", "ready_at"):
                entry[key] = min(entry.get(key, value), value)
            else:
                entry[key] = entry.get(key, 0) + value

    def get(self) -> dict:
        return self.stats


def _metrics_actor():
    if not ray.is_initialized():  # outside Ray (unit tests, benchmarks): never start or join a cluster
        return None
    try:
        return ray.get_actor(ACTOR_NAME)
    except (ValueError, RuntimeError):
        return None


def start_metrics():
    """Create (or replace) the job's metrics actor and return its handle."""
    try:
        ray.kill(ray.get_actor(ACTOR_NAME))
    except ValueError:
        pass
    return StageMetrics.options(name=ACTOR_NAME).remote()


class Reporter:
    """Reports one stage's metrics from inside a Ray worker. ``refresh``: look the metrics actor
    up at every report (for long-lived service replicas, which outlive one job's actor)."""

    def __init__(self, stage: str, refresh: bool = False):
        self.stage, self.refresh = stage, refresh
        self._actor = None if refresh else _metrics_actor()

    def report(self, wait: bool = False, **values) -> None:
        """Add values to this stage's totals (fire and forget; ``wait``: until the actor has them,
        at most 10 s, as a replica does when it shuts down)."""
        actor = _metrics_actor() if self.refresh else self._actor
        if actor is not None:
            ref = actor.add.remote(self.stage, values)
            if wait:
                try:
                    ray.get(ref, timeout=10)
                except Exception:  # noqa: BLE001 - metrics only: a lost report never fails the caller
                    pass

    @contextmanager
    def batch(self, rows: int, **extra):
        """Time a batch and report its seconds and rows (plus ``extra`` values set inside)."""
        start, wall = time.perf_counter(), time.time()
        yield extra
        self.report(seconds=time.perf_counter() - start, rows=rows, batches=1, first_start=wall,
                    last_end=time.time(), **extra)
