"""The annotated run an export reads: its manifest, its shards, and the refusals of a path that
is not an annotated run or of an output that overlaps it."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..infra.config import LongFormConfig
from ..infra.io import InputError, Storage, inside, location, shard_stem
from ..output.folder import MANIFEST_FILE, OutputFolder
from ..output.schema import OUTPUT_TYPES

#: Output columns an export reads; a run whose shards lack one is refused.
REQUIRED_COLUMNS = ("prompt", "retrieval_prob", "retrieved", "passages", "candidates", "answer", "answer_raw",
                    "best_passage_id", "segments", "citations", "docs", "error", "model", "run_id")


class ExportError(ValueError):
    """A run or output location the export refuses; the message is one line."""


@dataclass
class Run:
    """An annotated run: its location, manifest, shards (sorted) and the input column names."""

    path: str
    manifest: dict
    shards: list[str]

    @property
    def config(self) -> dict:
        """The run's resolved config (empty for manifests that lack it)."""
        return self.manifest.get("config") or {}

    @property
    def columns(self) -> dict:
        """Input column names, default task and prompt template settings of the run (the
        annotation config's defaults when absent; runs made before ``selfrag.prompt_style``
        existed used the paper's wording)."""
        inp, selfrag = self.config.get("input") or {}, self.config.get("selfrag") or {}
        long_form = selfrag.get("long_form") or {}
        return {"id": inp.get("id_column", "id"), "question": inp.get("question_column", "instruction"),
                "input": inp.get("input_column", "input"), "task": inp.get("task_column", "task"),
                "default_task": inp.get("default_task"), "prompt_style": selfrag.get("prompt_style", "paper"),
                "long_form_tasks": long_form.get("tasks", LongFormConfig().tasks) if long_form.get("enabled", True)
                else []}

    @property
    def config_hash(self) -> str | None:
        """The run's annotation hash (newer manifests) or config hash (older ones)."""
        return self.manifest.get("annotation_hash") or self.manifest.get("config_hash")

    @property
    def model(self) -> str | None:
        """The run's model (``engine.model``)."""
        return (self.config.get("engine") or {}).get("model")


def open_run(output: OutputFolder) -> Run:
    """Read and check an annotated run; raises ExportError (one line) when ``output`` is not one:
    no ``_manifest.json``, no shards, or shards lacking the output columns or the question column."""
    path = output.path
    try:
        if not output.exists(output.manifest_file):
            raise ExportError(f"{path} is not an annotated run: no {MANIFEST_FILE} there "
                              "(give --run the output.path of an annotation job)")
        manifest = json.loads(output.read_text(output.manifest_file))
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable, bad JSON, endpoint: one line
        raise ExportError(f"cannot read the manifest of {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(manifest, dict):
        raise ExportError(f"{path} is not an annotated run: {MANIFEST_FILE} is not a JSON object")
    try:
        shards = output.list_shards()
    except InputError as exc:
        raise ExportError(f"{path} is not an annotated run: {exc}") from None
    run = Run(path, manifest, shards)
    question = run.columns["question"]
    for shard in shards:
        try:
            schema, _ = output.storage.read_footer(shard)
        except InputError as exc:
            raise ExportError(str(exc)) from None
        missing = [c for c in (*REQUIRED_COLUMNS, question) if c not in schema.names]
        if missing:
            raise ExportError(f"{path} is not an annotated run: shard {shard_stem(shard)} lacks the columns "
                              f"{missing}")
    return run


def check_locations(storage: Storage, run: str, output: str) -> None:
    """Refuse an output that is the run, lies inside it or contains it (canonical locations, as
    the annotation job's preflight compares them), or cannot be written."""
    out, src = location(output), location(run)
    if inside(out, src) or inside(src, out):
        relation = "is" if out == src else ("is inside" if inside(out, src) else "contains")
        raise ExportError(f"output {output} {relation} the run {run} ({src}); choose an output outside the run")
    try:
        storage.check_writable(output)
    except Exception as exc:  # noqa: BLE001 - endpoint, credentials, bucket, permissions: one message
        raise ExportError(f"cannot write to output location {output}: {type(exc).__name__}: {exc}") from None


assert set(REQUIRED_COLUMNS) <= set(OUTPUT_TYPES)
