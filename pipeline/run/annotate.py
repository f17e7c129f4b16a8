"""The annotation run: preflight, take the output's lease, annotate the shards not done yet
(``pipeline.run.execute``), write the manifest and the report."""

from __future__ import annotations

import sys
import time

from ..runtime import phase_times
from ..infra.config import Config
from ..infra.console import say
from ..output.folder import MANIFEST_FILE, OutputFolder
from ..output.lease import Lease
from ..output.manifest import build_manifest
from .preflight import preflight
from .execute import execute
from .output import prepare_output


def run(cfg: Config) -> dict:
    """Preflight, take the output's lease, annotate the shards not done yet, write the manifest;
    returns the manifest."""
    phase_times.start_run()
    plan = preflight(cfg)
    phase_times.mark("preflight")
    duplicates = plan.ids["duplicates"]
    if duplicates["rows"]:
        say(f"warning: {duplicates['rows']} row(s) share an id with an earlier row ({duplicates['ids']} id(s), "
            f"e.g. {duplicates['examples']}); they are annotated all the same and counted in {MANIFEST_FILE}",
            file=sys.stderr)
    run_id = cfg.run_id or plan.annotation_hash
    output = plan.output
    lease = Lease.acquire(output, run_id, stale_after_s=cfg.output.lease_stale_after_s,
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
        output.write_json(output.manifest_file, manifest, indent=2)
        if cfg.output.report:
            report_run(output)
    finally:
        lease.release()
    return manifest


def report_run(output: OutputFolder) -> None:
    """Write the output's report.html; a failure costs the report only (one warning line)."""
    from ..report.write import write_report

    try:
        print(f"report: {write_report(output)}", flush=True)
    except Exception as exc:  # noqa: BLE001 - the annotations are written; the report is a view of them
        say(f"warning: no report written ({type(exc).__name__}: {exc})", file=sys.stderr)
