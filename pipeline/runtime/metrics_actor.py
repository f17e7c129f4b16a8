"""Per-stage metrics shared across Ray workers through one named actor.

Stages report busy seconds, rows, generated tokens and start-up seconds; the job reads the
totals at the end (they go into the run manifest and the benchmark). Reporting is a no-op
when no metrics actor runs (e.g. a stage used outside the job).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import ray

#: Namespace of every job's metrics actor: a Serve replica lives in the namespace of whichever
#: job started the Serve controller, so a per-driver namespace would hide a later job's actor.
NAMESPACE = "selfrag-metrics"
#: How long a reporter waits before it looks again for a metrics actor it did not find.
LOOKUP_AGAIN_S = 1.0
#: The driver's own handle on its metrics actor, by (driver's node, name): Ray ends an actor once
#: its creator holds no handle (a handle looked up by name does not count), and the actor must
#: outlive the run that started it (the driver's next run resets it).
_held: dict = {}


class MetricsTotals:
    """Sums per stage or service: seconds (busy in batches), rows, batches, generated tokens and
    other counters; the slowest replica's start-up (init_seconds); first batch start, last
    batch end, the first replica starting and the first ready (epoch seconds). In a Ray job it
    is the job's metrics actor (``StageMetrics``); a run in one process reports to one directly."""

    def __init__(self):
        self.stats: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()  # in one process, replicas report from threads of their own

    def add(self, stage: str, values: dict) -> None:
        with self._lock:
            entry = self.stats.setdefault(stage, {})
            for key, value in values.items():
                if key in ("init_seconds", "last_end"):
                    entry[key] = max(entry.get(key, value), value)
                elif key in ("first_start", "ready_at", "starting_at"):
                    entry[key] = min(entry.get(key, value), value)
                else:
                    entry[key] = entry.get(key, 0) + value

    def get(self) -> dict:
        with self._lock:
            return {stage: dict(entry) for stage, entry in self.stats.items()}

    def reset(self) -> None:
        self.stats = {}


StageMetrics = ray.remote(num_cpus=0)(MetricsTotals)


def job_actor_name() -> str | None:
    """The name of this Ray job's metrics actor (the driver and its stage actors share the job);
    None outside Ray (unit tests, benchmarks: never start or join a cluster)."""
    if not ray.is_initialized():
        return None
    return f"selfrag-stage-metrics-{ray.get_runtime_context().get_job_id()}"


def _lookup(name: str | None):
    if name is None or not ray.is_initialized():
        return None
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except (ValueError, RuntimeError):
        return None


def start_metrics():
    """This job's metrics actor, with no figures yet: the one an earlier run of this driver
    process left (reset: running services that served that run keep their handle to it), or a
    new one on the driver's node (left to the scheduler, it may land on a worker node, and the
    run's metrics would die with that node while the run itself survives the loss). It ends
    with the driver."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = job_actor_name()
    key = (ray.get_runtime_context().get_node_id(), name)  # a driver that restarted Ray holds stale handles
    held = _held.get(key)
    if held is not None:
        try:
            ray.get(held.reset.remote(), timeout=30)
            return held
        except Exception:  # noqa: BLE001 - dead or unresponsive: replaced
            del _held[key]
    old = _lookup(name)
    if old is not None:
        ray.kill(old)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    _held[key] = StageMetrics.options(name=name, namespace=NAMESPACE, scheduling_strategy=here).remote()
    return _held[key]


class Reporter:
    """Reports one stage's metrics to a job's metrics actor: this job's (a stage actor), or, in a
    service replica that serves any job, the job named by the last request (``follow``); or,
    in a run in one process, to its ``MetricsTotals`` (``target``)."""

    def __init__(self, stage: str, target: str | MetricsTotals | None = None):
        self.stage = stage
        self.target = target or job_actor_name()
        self._actor, self._next_lookup = None, 0.0
        if isinstance(self.target, MetricsTotals):
            self._actor, self.target = self.target, None

    def follow(self, target: str | None) -> None:
        """Report to the metrics actor named ``target`` from now on (None or the same: no change)."""
        if target and target != self.target:
            self.target, self._actor, self._next_lookup = target, None, 0.0

    def report(self, wait: bool = False, **values) -> None:
        """Add values to this stage's totals (fire and forget; ``wait``: until the actor has them,
        at most 10 s, as a replica does when it shuts down). The actor is looked up once per
        target, and again at most every ``LOOKUP_AGAIN_S`` while it is not found (a service
        deployed before the job that it reports to started its actor); reports meanwhile are lost."""
        if self._actor is None and self.target is not None and time.monotonic() >= self._next_lookup:
            self._actor, self._next_lookup = _lookup(self.target), time.monotonic() + LOOKUP_AGAIN_S
        if isinstance(self._actor, MetricsTotals):
            self._actor.add(self.stage, values)
        elif self._actor is not None:
            ref = self._actor.add.remote(self.stage, values)
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
