"""The Ray Data part of an annotation run: start Ray and the services, run the chain of stages
over the shards still to do, commit each, and collect the stage metrics."""

from __future__ import annotations

import logging
import os
import signal
import time

from ..runtime import phase_times, phases
from ..infra.config import Config
from ..infra.console import say
from ..output.lease import Lease
from .preflight import Plan
from ..runtime.progress import Progress
from ..runtime.ray_connect import init_ray
from ..output.run_log import capture_workers, quiet
from ..services.deploy import (cluster_nodes, cluster_total, services_awaited_beside, start_services,
                               stop_services, wait_for_engine_start, wait_for_services)
from ..services.reporting import REPORT_EVERY_S
from ..model.tokenizer import tokenizer_spec
from .errors import IncompleteRun
from .in_process import execute_in_process, run_batches
from ..stages.chain import stage_kinds
from .runner import reuses_services, runs_in_process
from .signals import catch_interrupts, interrupt
from .stage_metrics import await_service_reports, collect_stage_metrics

log = logging.getLogger(__name__)


def commit_ready_shard(cfg: Config, plan: Plan, shard: str, run_id: str) -> dict:
    """Commit a shard no row will reach the writer for: an empty one (its output file has the
    output schema and no rows), or one whose rows were all staged by an earlier run."""
    from ..stages.prepare import prepare_table
    from ..stages.write import commit_shard

    n = plan.todo[shard]
    held = None if n else {0: [prepare_table(plan.storage.read_table(shard), shard, cfg.input, cfg.engine.model,
                                             run_id, plan.schema, selfrag=cfg.selfrag)]}
    return commit_shard(plan.output, plan.annotation_hash, shard, n, held, plan.versions.get(shard),
                        stage_rows=cfg.output.stage_rows, identity=plan.identity)


def check_lease(lease: Lease | None) -> None:
    """Stop (IncompleteRun) if another run has taken this run's lease over: its heartbeat was
    missed for longer than ``output.lease_stale_after_s``, and two runs must not write one output."""
    if lease is not None and lease.lost:
        raise IncompleteRun("another run took over the output's lease (this run's heartbeat was missed for longer "
                            "than output.lease_stale_after_s); stopping here: the shards written are complete")


def execute(cfg: Config, plan: Plan, run_id: str, lease: Lease | None = None) -> tuple[list[dict], dict]:
    """Annotate the shards still to do: on Ray (Ray Data stages, Serve services), or in this
    process (``runner``: everything here, or, with running services named, the stages here and
    the services on the cluster); returns (written shards, stage metrics). ``lease``: the run's
    lease on the output, checked after every shard."""
    import ray

    from .dataflow import build_dataset
    from ..runtime.metrics_actor import start_metrics

    ready = [shard for shard, n in plan.todo.items() if plan.staged.get(shard, 0) == n]
    written = [commit_ready_shard(cfg, plan, shard, run_id) for shard in ready]
    todo = {shard: n for shard, n in plan.todo.items() if shard not in ready}
    if not todo:
        return written, {}
    rows = sum(n - plan.staged.get(shard, 0) for shard, n in todo.items())
    plan.runner = "in_process" if runs_in_process(cfg, rows) else "ray"
    if plan.runner == "in_process" and not reuses_services(cfg):
        return execute_here(cfg, plan, todo, run_id, lease, written)
    phases.reached("before_ray_init")
    try:
        init_ray(cfg.ray.address, configure_logging=not quiet(), dashboard=cfg.ray.dashboard)
        catch_interrupts()  # ours again, over Ray's
    except SystemExit as exc:  # Ray's own SIGTERM handler, installed while it starts, exits with the signal
        if exc.code == signal.SIGTERM:
            interrupt(signal.SIGTERM, None)  # one clean stop, as if ours had caught it: raises Interrupted
        raise
    capture_workers()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = cfg.ray.progress_bars
    phase_times.mark("ray_init")
    metrics = start_metrics()
    start = plan.timeline_origin = time.time()
    tokenizer = tokenizer_spec(plan.storage, cfg.engine.model)
    say(f"starting the engine service ({cfg.engine.service.replicas} replica(s) of {cfg.engine.model})"
        + (" and the retriever" if cfg.selfrag.mode != "never" else "") + " ...")
    services = start_services(cfg, tokenizer, retrieval=cfg.selfrag.mode != "never", wait=False)
    total = sum(plan.todo.values())
    before = sum(w["rows"] for w in written) + sum(plan.staged.get(s, 0) for s in todo)  # no model work left

    def rows_done() -> int:  # rows that reached the writer in this run, and those done before
        return before + int(ray.get(metrics.get.remote(), timeout=5).get("write", {}).get("rows", 0))

    try:  # from here on, whatever happens, the applications this job deployed are removed
        overlap = cfg.stages.start_with_services
        if overlap is None:
            overlap = cluster_total(cluster_nodes())["CPU"] >= 4
        if overlap:
            wait_for_engine_start(services, metrics)  # then the stage actors start while the model loads
        else:
            wait_for_services(services)
            print(f"services ready after {time.time() - start:.0f} s", flush=True)
        phase_times.mark("services_ready")  # replaced below by the engine's own readiness when the job started it
        with services_awaited_beside(services), Progress(total, rows_done) as shown:
            if plan.runner == "in_process":  # running services, the stages here: no stage actor to start
                chain = [kind(cfg, tokenizer, services.engine, services.retriever) for kind in stage_kinds(cfg)]
                run_batches(cfg, plan, todo, run_id, tokenizer, chain,
                            lambda summary: shard_written(cfg, plan, lease, written, shown, summary))
            else:
                dataset = build_dataset(cfg, plan.output, todo, plan.schema, run_id, plan.annotation_hash, tokenizer,
                                        services, plan.versions, identity=plan.identity)
                for summary in dataset.iter_rows():
                    shard_written(cfg, plan, lease, written, shown, summary)
                phase_times.mark("committed")
        reused = [name for name, app in (("engine", services.engine), ("retriever", services.retriever))
                  if app is not None and app not in services.owned]
        if reused:  # their replicas report on their own: wait for the last calls' counters
            behind = await_service_reports(metrics, reused, timeout_s=REPORT_EVERY_S + 1.0)
            if behind:
                log.warning("the reused services have not reported these calls: %s; the manifest's service "
                            "figures leave them out", behind)
    finally:
        stop_services(services)  # an engine replica sends its last counters as it shuts down
    return finished(plan, written, collect_stage_metrics(metrics, start), start)


def execute_here(cfg: Config, plan: Plan, todo: dict[str, int], run_id: str, lease: Lease | None,
                 written: list[dict]) -> tuple[list[dict], dict]:
    """``execute`` in this process, without Ray (``runner``: ``pipeline.run.in_process``)."""
    from ..runtime.metrics_actor import MetricsTotals

    totals = MetricsTotals()
    total = sum(plan.todo.values())
    before = sum(w["rows"] for w in written) + sum(plan.staged.get(s, 0) for s in todo)

    def rows_done() -> int:  # rows that reached the writer in this run, and those done before
        return before + int(totals.get().get("write", {}).get("rows", 0))

    with Progress(total, rows_done) as shown:
        stages = execute_in_process(cfg, plan, todo, run_id,
                                    lambda summary: shard_written(cfg, plan, lease, written, shown, summary), totals)
    return finished(plan, written, stages, plan.timeline_origin)


def shard_written(cfg: Config, plan: Plan, lease: Lease | None, written: list[dict], shown: Progress,
                  summary: dict) -> None:
    """A shard was committed: check the lease, record and print it (``debug.exit_after_shards``:
    die here once that many are written)."""
    check_lease(lease)
    written.append(summary)
    done = sum(w["rows"] for w in written)
    shown.line(f"wrote {summary['output']} ({summary['rows']} rows, {summary['errors']} errors) "
               f"[{len(written)}/{len(plan.todo)} shards, {shown.status(done)}]", done)
    if cfg.debug.exit_after_shards is not None and len(written) >= cfg.debug.exit_after_shards:
        print(f"debug.exit_after_shards={cfg.debug.exit_after_shards}: exiting now", flush=True)
        os._exit(3)  # fault injection: die like a killed process, no cleanup


def finished(plan: Plan, written: list[dict], stages: dict, start: float) -> tuple[list[dict], dict]:
    """(written shards, stage metrics) of a run whose every shard was written; the engine's
    phases (its readiness, first and last request) from its metrics. IncompleteRun otherwise."""
    engine = stages.get("engine") or {}
    for phase, key in (("first_request", "first_start"), ("last_request", "last_end")):
        if key in engine:
            phase_times.mark(phase, start + engine[key])
    if "ready_at" in engine:  # an engine the job started: its first replica's readiness (the job saw the
        phase_times.mark("services_ready", start + engine["ready_at"])  # application running later; rows flowed)
    missing = sorted(set(plan.todo) - {w["shard"] for w in written})
    if missing:
        raise IncompleteRun(f"{len(missing)} shard(s) were not completely annotated: {missing}; their staged "
                            "rows are kept: run the same command again to annotate only the rest")
    return written, stages
