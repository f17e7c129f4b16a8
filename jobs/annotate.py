"""Annotate Parquet shards of questions with Self-RAG.

    python -m jobs.annotate [--config FILE ...] [key=value ...]

Works locally (starts a local Ray) and as a ``ray job submit`` entrypoint (joins the cluster).
Writes one Parquet file per input shard, a success marker per shard (``_done/``),
``_config.yaml`` and ``_manifest.json`` to ``output.path``. Shards already done are skipped
unless ``output.overwrite=true``, so a killed run is resumed by running it again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

from pipeline import io, phase_times, phases, staging
from pipeline.config import Config, ConfigError, load_config, to_yaml
from pipeline.console import no_space, print_error, say
from pipeline.io import InputError, join, write_text
from pipeline.lease import Lease, LeaseHeld
from pipeline.manifest import build_manifest
from pipeline.preflight import DONE_DIR, Plan, PreflightError, marker_path, preflight
from pipeline.progress import Progress
from pipeline.ray_connect import init_ray, stop_ray
from pipeline.run_log import RunLog, capture_workers, quiet
from pipeline.services.deploy import (ServicesUnavailable, cluster_nodes, cluster_total, services_awaited_beside,
                                      start_services, stop_services, wait_for_engine_start, wait_for_services)
from pipeline.services.reporting import REPORT_EVERY_S
from pipeline.tokenizer import tokenizer_spec

CONFIG_FILE, MANIFEST_FILE = "_config.yaml", "_manifest.json"

log = logging.getLogger(__name__)


class IncompleteRun(RuntimeError):
    """Some shards were not written (their rows did not all come back)."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the driver (a BaseException, like KeyboardInterrupt, so no
    ``except Exception`` on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum, _frame):
    for sig in (signal.SIGINT, signal.SIGTERM):  # one clean stop; repeated signals wait for it
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def _set_handlers(handlers: dict) -> None:
    if threading.current_thread() is threading.main_thread():  # only the main thread takes signals
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def catch_interrupts() -> None:
    """Turn SIGINT and SIGTERM into ``Interrupted``."""
    _set_handlers({signal.SIGINT: _interrupt, signal.SIGTERM: _interrupt})


def restore_signals() -> None:
    """Python's own handlers again (SIGINT raises KeyboardInterrupt, SIGTERM ends the process)."""
    _set_handlers({signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL})


def shutdown_ray() -> None:
    """Stop this driver's Ray, in whatever phase it is: a local Ray it started goes down with
    every process of it (Ray's agents included), even one a signal caught inside ``ray.init``;
    on a cluster the job's actors end with its connection (``pipeline.ray_connect.stop_ray``)."""
    stop_ray()


def parse_args(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(config files, key=value overrides) from the command line."""
    parser = argparse.ArgumentParser(prog="python -m jobs.annotate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML preset (repeatable; later files win)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def commit_ready_shard(cfg: Config, plan: Plan, shard: str, run_id: str) -> dict:
    """Commit a shard no row will reach the writer for: an empty one (its output file has the
    output schema and no rows), or one whose rows were all staged by an earlier run."""
    from pipeline.stages.prepare import prepare_table
    from pipeline.stages.write import commit_shard

    n = plan.todo[shard]
    held = None if n else {0: [prepare_table(io.read_table(shard), shard, cfg.input, cfg.engine.model, run_id,
                                             plan.schema, selfrag=cfg.selfrag)]}
    return commit_shard(cfg.output.path, plan.annotation_hash, shard, n, held, plan.versions.get(shard),
                        stage_rows=cfg.output.stage_rows, identity=plan.identity)


def check_lease(lease: Lease | None) -> None:
    """Stop (IncompleteRun) if another run has taken this run's lease over: its heartbeat was
    missed for longer than ``output.lease_stale_after_s``, and two runs must not write one output."""
    if lease is not None and lease.lost:
        raise IncompleteRun("another run took over the output's lease (this run's heartbeat was missed for longer "
                            "than output.lease_stale_after_s); stopping here: the shards written are complete")


def execute(cfg: Config, plan: Plan, run_id: str, lease: Lease | None = None) -> tuple[list[dict], dict]:
    """Run the Ray Data pipeline over the shards still to do; returns (written shards, stage metrics).
    ``lease``: the run's lease on the output, checked after every shard."""
    import ray

    from pipeline.dataflow import build_dataset
    from pipeline.metrics import start_metrics

    ready = [shard for shard, n in plan.todo.items() if plan.staged.get(shard, 0) == n]
    written = [commit_ready_shard(cfg, plan, shard, run_id) for shard in ready]
    todo = {shard: n for shard, n in plan.todo.items() if shard not in ready}
    if not todo:
        return written, {}
    phases.reached("before_ray_init")
    try:
        init_ray(cfg.ray.address, configure_logging=not quiet())
        catch_interrupts()  # ours again, over Ray's
    except SystemExit as exc:  # Ray's own SIGTERM handler, installed while it starts, exits with the signal
        if exc.code == signal.SIGTERM:
            _interrupt(signal.SIGTERM, None)  # one clean stop, as if ours had caught it: raises Interrupted
        raise
    capture_workers()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = cfg.ray.progress_bars
    phase_times.mark("ray_init")
    metrics = start_metrics()
    start = plan.timeline_origin = time.time()
    tokenizer = tokenizer_spec(cfg.engine.model)
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
        dataset = build_dataset(cfg, todo, plan.schema, run_id, plan.annotation_hash, tokenizer, services,
                                plan.versions, identity=plan.identity)
        with services_awaited_beside(services), Progress(total, rows_done) as shown:
            for summary in dataset.iter_rows():
                check_lease(lease)
                written.append(summary)
                done = sum(w["rows"] for w in written)
                shown.line(f"wrote {summary['output']} ({summary['rows']} rows, {summary['errors']} errors) "
                           f"[{len(written)}/{len(plan.todo)} shards, {shown.status(done)}]", done)
                if cfg.debug.exit_after_shards is not None and len(written) >= cfg.debug.exit_after_shards:
                    print(f"debug.exit_after_shards={cfg.debug.exit_after_shards}: exiting now", flush=True)
                    os._exit(3)  # fault injection: die like a killed process, no cleanup
        phase_times.mark("committed")
        if {services.engine, services.retriever} - set(services.owned) - {None}:
            time.sleep(REPORT_EVERY_S + 0.5)  # a running service it reuses reports every REPORT_EVERY_S
    finally:
        stop_services(services)  # an engine replica sends its last counters as it shuts down
    stages = collect_stage_metrics(metrics, start)
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


def collect_stage_metrics(metrics, start: float) -> dict:
    """The metrics actor's totals (``stage_metrics``), then the actor ends. An actor lost with its
    node costs the run its metrics only: the manifest records ``{"lost": ...}`` instead."""
    import ray

    try:
        stages = stage_metrics(ray.get(metrics.get.remote()), start)
    except ray.exceptions.RayActorError as exc:
        print(f"warning: the stage metrics were lost ({type(exc).__name__}: the metrics actor died, e.g. with "
              "its node); the annotations are not affected", file=sys.stderr, flush=True)
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


def prepare_output(cfg: Config, plan: Plan) -> None:
    """With the lease held and every check passed: clear what this run replaces (temporary files
    of interrupted writes; old markers and staged rows with ``overwrite``; staged rows of
    another annotation identity, or of input shards replaced since, otherwise), count the rows
    staged by an earlier run, and write the resolved config."""
    if cfg.output.overwrite:
        for shard in plan.todo:
            io.remove(marker_path(cfg.output.path, shard))
    for directory in (cfg.output.path, join(cfg.output.path, DONE_DIR)):  # what an interrupted write left
        io.remove_temporaries(directory)
    removed = staging.remove_other_identities(cfg.output.path, None if cfg.output.overwrite else plan.annotation_hash)
    if removed:
        say(f"removed staged rows of other annotation identities: {removed}")
    for shard in plan.todo:
        if staging.discard_if_changed(cfg.output.path, plan.annotation_hash, shard, plan.versions.get(shard)):
            say(f"input shard {shard} changed since an earlier run staged its rows: they are discarded and the "
                "shard is annotated whole")
    plan.staged = {shard: len(staging.staged_offsets(cfg.output.path, plan.annotation_hash, shard))
                   for shard in plan.todo}
    write_text(join(cfg.output.path, CONFIG_FILE), to_yaml(cfg))


def run(cfg: Config) -> dict:
    """Preflight, take the output's lease, annotate the shards not done yet, write the manifest;
    returns the manifest."""
    phase_times.start_run()
    plan = preflight(cfg)
    phase_times.mark("preflight")
    duplicates = plan.ids["duplicates"]
    if duplicates["rows"]:
        say(f"warning: {duplicates['rows']} row(s) share an id with an earlier row ({duplicates['ids']} id(s), "
            f"e.g. {duplicates['examples']}); they are annotated all the same and counted in _manifest.json",
            file=sys.stderr)
    run_id = cfg.run_id or plan.annotation_hash
    lease = Lease.acquire(cfg.output.path, run_id, stale_after_s=cfg.output.lease_stale_after_s,
                          heartbeat_s=cfg.output.lease_heartbeat_s)
    try:
        prepare_output(cfg, plan)
        staged = sum(plan.staged.values())
        say(f"{len(plan.todo)} shard(s) to annotate, {len(plan.done)} already done, {len(plan.bad)} skipped "
            f"as unreadable -> {cfg.output.path} (run {run_id})"
            + (f"; {staged} row(s) staged by an earlier run are kept" if staged else ""))
        started = time.time()
        written, stages = execute(cfg, plan, run_id, lease) if plan.todo else ([], {})
        phase_times.mark("exit")
        manifest = build_manifest(cfg, plan, run_id, written, stages, seconds=time.time() - started,
                                  phases=phase_times.relative())
        write_text(join(cfg.output.path, MANIFEST_FILE), json.dumps(manifest, indent=2))
        if cfg.output.report:
            report_run(cfg.output.path)
    finally:
        lease.release()
    return manifest


def report_run(path: str) -> None:
    """Write the output's report.html; a failure costs the report only (one warning line)."""
    from jobs.report import write_report

    try:
        print(f"report: {write_report(path)}", flush=True)
    except Exception as exc:  # noqa: BLE001 - the annotations are written; the report is a view of them
        say(f"warning: no report written ({type(exc).__name__}: {exc})", file=sys.stderr)


def print_examples(cfg: Config, n: int, scan_rows: int = 5000) -> None:
    """``n`` example annotations of the output (from its first shards, at most ``scan_rows`` rows read)."""
    from pipeline.report import examples

    question = cfg.input.question_column
    rows: list[dict] = []
    for shard in io.list_shards([cfg.output.path]):
        rows += io.read_columns(shard, (*examples.COLUMNS, question)).to_pylist()
        if len(rows) >= scan_rows:
            break
    chosen = examples.pick(rows, n)
    if chosen:
        print(f"\n{len(chosen)} example annotation(s):")
    for i, row in enumerate(chosen, 1):
        print(f"\n{i}. {examples.describe(row, row.get(question) or '')}", flush=True)


def print_summary(manifest: dict) -> None:
    """The short human summary printed at the end of a run."""
    this_run = manifest["this_run"]
    rows = this_run["rows"]
    rate = f"{this_run['retrieved'] / rows:.1%}" if rows else "n/a"
    print(
        f"\ndone: {rows} rows in {this_run['shards']} shard(s), retrieval rate {rate}, "
        f"{this_run['errors']} error row(s), {this_run['rows_per_s']} rows/s; "
        f"{len(manifest['skipped_done'])} shard(s) skipped as already done, "
        f"{len(manifest['skipped_bad'])} as unreadable\noutput: {manifest['output']}",
        flush=True,
    )


def failure_message(exc: BaseException, output: str) -> str:
    """The one line that says why a run failed after it started (a full disk, or anything else)."""
    full = no_space(exc)
    if full is not None:
        return (f"no space left on the device or quota holding {output} ({full}); the shards written "
                "are complete and marked done, nothing partial is visible: free space and run the same command "
                "again to resume")
    return (f"the run failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} "
            f"(the traceback is in the run log; shards written are complete: run the same command again to resume)")


def main(argv: list[str] | None = None) -> int:
    """Entrypoint: returns the process exit code (2: refused before any work; 1: incomplete run)."""
    phase_times.mark("imports")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    files, overrides = parse_args(argv)
    catch_interrupts()
    cfg, run_log, keep_log = None, None, True
    try:
        cfg = load_config(files, overrides)
        run_log = RunLog(cfg.log_level)
        run_log.start()
        manifest = run(cfg)
    except (ConfigError, InputError, PreflightError, LeaseHeld) as exc:
        keep_log = False  # refused before any work: nothing is written to the output
        print_error(exc)
        return 2
    except IncompleteRun as exc:
        print_error(exc)
        return 1
    except ServicesUnavailable as exc:
        shutdown_ray()
        print_error(exc)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line on the console; the traceback goes to the run log
        log.info("the run failed", exc_info=True)
        shutdown_ray()
        print_error(failure_message(exc, cfg.output.path if cfg is not None else "the output"))
        return 1
    except Interrupted as exc:
        shutdown_ray()
        name = signal.Signals(exc.signum).name
        print(f"interrupted by {name}: shards already written are complete and marked done; run the same "
              "command again to resume (it skips them)", file=sys.stderr, flush=True)
        return 128 + exc.signum
    finally:
        restore_signals()
        if run_log is not None:
            saved = run_log.close(cfg.output.path if keep_log else None, cfg.run_id)
            if saved:
                print(f"log: {saved}", flush=True)
    print_summary(manifest)
    if cfg.output.examples:
        print_examples(cfg, cfg.output.examples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
