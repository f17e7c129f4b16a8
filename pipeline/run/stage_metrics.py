"""The per-stage figures of a run, from the job's metrics actor, for the manifest."""

from __future__ import annotations

import sys


def collect_stage_metrics(metrics, start: float) -> dict:
    """The metrics actor's totals (``stage_metrics``), then the actor ends. The actor lives on the
    driver's node; if it died anyway, the run loses its metrics only: the manifest records
    ``{"lost": ...}`` instead."""
    import ray

    try:
        stages = stage_metrics(ray.get(metrics.get.remote()), start)
    except ray.exceptions.RayActorError as exc:
        print(f"warning: the stage metrics were lost ({type(exc).__name__}: the metrics actor died); "
              "the annotations are not affected", file=sys.stderr, flush=True)
        return {"lost": type(exc).__name__}
    ray.kill(metrics)
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
