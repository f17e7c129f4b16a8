"""The per-stage figures of a run, from the job's metrics actor, for the manifest."""

from __future__ import annotations

import sys
import time

#: Service name in the metrics -> the stages' count of the calls it answered.
CALLS_MADE = {"engine": "engine_calls", "retriever": "retriever_calls"}


def collect_stage_metrics(metrics, start: float) -> dict:
    """The metrics actor's totals (``stage_metrics``). The actor lives on the driver's node (and
    ends with the driver); if it died anyway, the run loses its metrics only: the manifest
    records ``{"lost": ...}`` instead."""
    import ray

    try:
        stages = stage_metrics(ray.get(metrics.get.remote()), start)
    except ray.exceptions.RayActorError as exc:
        print(f"warning: the stage metrics were lost ({type(exc).__name__}: the metrics actor died); "
              "the annotations are not affected", file=sys.stderr, flush=True)
        return {"lost": type(exc).__name__}
    return stages


def stage_metrics(stages: dict, start: float) -> dict:
    """The metrics actor's totals with the timeline relative to the start of the run and the
    engine's prefix-cache hit rate (vLLM's prefix-cache hits over queries, in tokens)."""
    for entry in stages.values():
        for key in ("first_start", "last_end", "ready_at", "starting_at"):
            if key in entry:
                entry[key] = round(entry[key] - start, 2)
    engine = stages.get("engine")
    if engine and engine.get("prefix_cache_queries"):
        engine["prefix_cache_hit_rate"] = round(engine["prefix_cache_hits"] / engine["prefix_cache_queries"], 4)
    if engine and engine.get("steps"):  # mean batch the scheduler ran, and mean queue behind it
        engine["mean_running_requests"] = round(engine["running_sum"] / engine["steps"], 1)
        engine["mean_waiting_requests"] = round(engine["waiting_sum"] / engine["steps"], 1)
    return stages


def calls_unreported(stats: dict, services: list[str]) -> dict:
    """Per service in ``services``: how many calls the stages had answered that its replicas
    have not reported yet (only the services with some)."""
    behind = {}
    for service in services:
        made = sum(entry.get(CALLS_MADE[service], 0) for entry in stats.values())
        missing = made - stats.get(service, {}).get("calls", 0)
        if missing > 0:
            behind[service] = missing
    return behind


def await_service_reports(metrics, services: list[str], timeout_s: float) -> dict:
    """Wait until the replicas of ``services`` (running services the job reused, which report
    to it on their own) have reported every call the stages made (a replica reports soon after
    it runs out of calls); returns what is still unreported after ``timeout_s`` (empty: all)."""
    import ray

    deadline, pause = time.monotonic() + timeout_s, 0.02
    while True:
        behind = calls_unreported(ray.get(metrics.get.remote(), timeout=30), services)
        if not behind or time.monotonic() > deadline:
            return behind
        time.sleep(pause)
        pause = min(0.25, pause * 2)
