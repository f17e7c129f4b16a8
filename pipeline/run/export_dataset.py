"""The export of an annotated run as training data (``python -m jobs.export_dataset``): Ray Data
tasks over the run's shards (a first pass of duplicate keys with ``filters.dedupe``, then
convert, filter and write), then the summary (``_export.json``) and the dataset card."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

from ..infra.io import Storage, is_remote, join, shard_stem
from ..output.folder import OutputFolder
from ..export.card import render_card
from ..export.config import ExportConfig, config_dict
from ..export.convert import KINDS, convert_table, find_duplicates
from ..export.source import ExportError, Run, check_locations, open_run
from ..export.writer import write_records
from ..runtime.ray_connect import init_ray, stop_ray


def reflection_ids(cfg: ExportConfig, run: Run) -> dict[str, int] | None:
    """The reflection tokens' ids of the run's tokenizer (a local directory), for the critic's
    ISSUP / ISUSE probabilities; None when it cannot be loaded here."""
    path = cfg.tokenizer or run.model
    if not path or is_remote(path) or not os.path.isdir(path):
        return None
    try:
        from transformers import AutoTokenizer

        from ..selfrag.tokens import ReflectionIds

        tok = AutoTokenizer.from_pretrained(path)
        return ReflectionIds.from_lookup(tok.convert_tokens_to_ids, tok.unk_token_id).by_token
    except Exception as exc:  # noqa: BLE001 - the export goes on without those probabilities
        print(f"note: tokenizer {path} not loaded ({type(exc).__name__}); ISSUP/ISUSE probabilities are null",
              file=sys.stderr)
        return None


def prepare_output(cfg: ExportConfig, storage: Storage) -> None:
    """Refuse an output holding an earlier export unless ``overwrite``; then clear it."""
    earlier = [p for p in ("README.md", *KINDS) if storage.exists(join(cfg.output, p))]
    if earlier and not cfg.overwrite:
        raise ExportError(f"output {cfg.output} already holds an export ({', '.join(earlier)}); "
                          "set overwrite=true to replace it")
    for name in earlier:
        fs, path = storage.filesystem(join(cfg.output, name))
        fs.rm(path, recursive=True)


def shard_task(cfg: ExportConfig, storage: Storage, columns: dict, ids: dict | None, duplicates: dict | None):
    """The per-shard function of a Ray Data ``map``: keys only (``duplicates`` None) or convert
    and write (``storage``, which travels with it, reads and writes)."""
    def run(item: dict) -> dict:
        shard = item["shard"]
        stem = shard_stem(shard)
        if duplicates is None:
            result = convert_table(storage.read_table(shard), stem, columns, cfg, keys_only=True)
            return {"stem": stem, "payload": json.dumps(result.keys)}
        result = convert_table(storage.read_table(shard), stem, columns, cfg, set(duplicates.get(stem, ())), ids)
        files = [f for kind in KINDS for split, recs in result.records[kind].items()
                 for f in write_records(storage, recs, cfg.output, kind, split, stem, cfg.formats)]
        records = {kind: sum(len(v) for v in result.records[kind].values()) for kind in KINDS}
        return {"stem": stem, "payload": json.dumps({"counts": result.counts, "labels": result.labels,
                                                     "files": files, "records": records})}
    return run


def export(cfg: ExportConfig) -> dict:
    """Run the export; returns its summary (also written as ``_export.json``)."""
    import ray

    storage = Storage(cfg.storage)
    run = open_run(OutputFolder(cfg.run, storage))
    check_locations(storage, cfg.run, cfg.output)
    prepare_output(cfg, storage)
    ids = reflection_ids(cfg, run)
    # A Ray this driver did not find running is ended with the job (a local one it started goes
    # down; on a cluster, only this driver disconnects); one already running (tests) is left alone.
    started = not ray.is_initialized()
    init_ray(cfg.ray.address, dashboard=cfg.ray.dashboard)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False

        def over_shards(fn):
            ds = ray.data.from_items([{"shard": s} for s in run.shards], override_num_blocks=len(run.shards))
            return ds.map(fn, num_cpus=cfg.ray.num_cpus).take_all()

        duplicates: dict = {}
        if cfg.filters.dedupe:
            keys = {r["stem"]: [tuple(k) for k in json.loads(r["payload"])]
                    for r in over_shards(shard_task(cfg, storage, run.columns, ids, None))}
            duplicates = {stem: sorted(offsets) for stem, offsets in find_duplicates(keys).items()}
        task = shard_task(cfg, storage, run.columns, ids, duplicates)
        results = [json.loads(r["payload"]) for r in over_shards(task)]
    finally:
        if started:
            stop_ray()
    counts, labels, records, files = Counter(), Counter(), Counter(), []
    for r in results:
        counts.update(r["counts"])
        labels.update(r["labels"])
        records.update(r["records"])
        files += r["files"]
    splits = {kind: [s for s in ("train", "validation") if any(f"/{kind}/{s}/" in f for f in files)] for kind in KINDS}
    summary = {"source": {"run": cfg.run, "run_id": run.manifest.get("run_id"), "model": run.model,
                          "config_hash": run.config_hash, "shards": len(run.shards)},
               "counts": dict(counts), "labels": dict(labels), "records": dict(records), "splits": splits,
               "files": sorted(files), "config": config_dict(cfg)}
    summary["config"].pop("storage", None)
    storage.write_text(join(cfg.output, "_export.json"), json.dumps(summary, indent=2, sort_keys=True) + "\n")
    storage.write_text(join(cfg.output, "README.md"), render_card(summary))
    return summary
