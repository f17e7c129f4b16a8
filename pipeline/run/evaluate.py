"""The evaluation run (``python -m jobs.evaluate``): annotate the query shards once per mode
(``pipeline.run.annotate``, in this process) or read existing outputs, then score them, print
the tables and write ``report.json`` and ``report.html``."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from ..infra.config import Config, load_config
from ..infra.io import Storage
from ..output.folder import REPORT_FILE, OutputFolder
from ..evaluation import layouts, log, synthetic
from ..evaluation.metrics import report_runs
from ..evaluation.outputs import output_mode, read_output
from ..evaluation.sources import gold_in_corpus, load_queries, prepare_synthetic, write_synthetic
from ..evaluation.tables import print_generic, print_synthetic
from ..evaluation.tokens import token_info
from ..report.write import write_evaluation_report
from .errors import EvalError

MODES = synthetic.MODES
#: Config keys this job sets itself; overriding them is refused.
OWN_KEYS = ("input.paths", "output.path", "selfrag.mode", "output.keep_logprobs", "output.overwrite")
#: Defaults of this job's annotation runs (before the user's overrides): no progress bars, and
#: vLLM's own start-up logging at WARNING, so the progress lines stay readable.
QUIET = ("ray.progress_bars=false", "engine.env.VLLM_LOGGING_LEVEL=WARNING")


def parse_modes(text: str) -> list[str]:
    """``"adaptive,never"`` -> ``["adaptive", "never"]``; EvalError for unknown or repeated modes."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown or len(set(modes)) != len(modes):
        raise EvalError(f"--modes {text!r}: give distinct modes among {list(MODES)}, comma-separated")
    return modes


def check_overrides(overrides: list[str]) -> None:
    """EvalError for an override of a key this job sets itself (``OWN_KEYS``)."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in OWN_KEYS:
            raise EvalError(f"override {item!r}: {key} is set by jobs.evaluate ({', '.join(OWN_KEYS)})")


def run_configs(args, inputs: dict[str, list[str]], root: Path) -> dict[str, Config]:
    """The annotation config of each mode (``inputs``: mode -> query shard paths)."""
    configs = {}
    for mode, paths in inputs.items():
        configs[mode] = load_config(args.config, [
            *QUIET, *args.overrides,
            f"input.paths=[{','.join(paths)}]", f"output.path={root / mode}", f"selfrag.mode={mode}",
            "output.keep_logprobs=true", f"output.overwrite={'false' if args.resume else 'true'}",
        ])
    return configs


def annotate_all(configs: dict[str, Config], resume: bool) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """Preflight every run (nothing runs if one is refused), then annotate mode by mode."""
    from .preflight import preflight
    from .annotate import run

    for cfg in configs.values():
        preflight(cfg)
    runs, seconds = {}, {}
    for n, (mode, cfg) in enumerate(configs.items(), start=1):
        out = Path(cfg.output.path)
        if not resume and out.exists():
            shutil.rmtree(out)  # our own working directory: no stale shards of another input set
        log(f"run {n}/{len(configs)}: selfrag.mode={mode} -> {out}")
        start = time.time()
        manifest = run(cfg)
        seconds[mode] = round(time.time() - start, 1)
        runs[mode] = read_output(OutputFolder.of(cfg))
        this = manifest["this_run"]
        log(f"run {n}/{len(configs)} done in {seconds[mode]} s: {len(runs[mode])} rows "
            f"({this['rows']} annotated now), {sum(r['error'] is not None for r in runs[mode])} error rows")
    return runs, seconds


def evaluate(args) -> dict:
    """Do the evaluation the parsed arguments of ``python -m jobs.evaluate`` ask for; returns the
    report."""
    started = time.time()
    check_overrides(args.overrides)
    if args.max_per_kind < 0:
        raise EvalError(f"--max-per-kind {args.max_per_kind}: give 0 (all) or a positive number")
    cfg = load_config(args.config, [*QUIET, *args.overrides])
    storage = Storage(cfg.storage)
    if args.annotated:
        if args.modes:
            raise EvalError("--modes applies when annotating; --annotated scores existing outputs")
        runs, outputs = {}, {}
        for i, path in enumerate(args.annotated):
            output = OutputFolder(path, storage)
            rows = read_output(output)
            label = output_mode(output, rows) or f"run{i + 1}"
            label = label if label not in runs else f"{label}{i + 1}"
            runs[label], outputs[label] = rows, output
            log(f"{path}: {len(rows)} rows (label {label})")
        seconds: dict[str, float] = {}
        model = next((r.get("model") for rows in runs.values() for r in rows if r.get("model")), None)
        args.modes = list(runs)
        name = args.name or "annotated"
    else:
        args.modes = parse_modes(args.modes or ",".join(MODES))
        if args.queries:
            loaded = load_queries(storage, args.queries, args.format, args.task)  # every file checked before any write
            name = args.name or loaded[0][0][: -len(".parquet")]
            root = Path(args.workdir) / name
            paths = [str(root / "queries" / shard) for shard, _ in loaded]
            configs = run_configs(args, {mode: paths for mode in args.modes}, root)
            if not args.resume and (root / "queries").exists():
                shutil.rmtree(root / "queries")
            for (_, rows), path in zip(loaded, paths):
                storage.write_parquet_atomic(layouts.query_table(rows), path)
        else:
            name = args.name or "synthetic"
            root = Path(args.workdir) / name
            suite, inputs = prepare_synthetic(root, args.modes, args.world_seed, args.max_per_kind or None,
                                              args.seed, args.split)
            configs = run_configs(args, inputs, root)
            write_synthetic(storage, suite, root)
        runs, seconds = annotate_all(configs, args.resume)
        outputs = {mode: OutputFolder.of(c) for mode, c in configs.items()}
        model = cfg.engine.model
    tokens = token_info(storage, model)
    synthetic_rows = any(r.get("probe") is not None for rows in runs.values() for r in rows)
    if synthetic_rows or (not args.annotated and not args.queries):
        rep = synthetic.report(runs, tokens)
        rep["gold_in_corpus"] = gold_in_corpus(cfg, storage, [r for rows in runs.values() for r in rows])
        print_synthetic(rep, args.modes)
    else:
        rep = report_runs(runs, tokens, closed_metric=args.closed_set_metric)
        print_generic(rep)
    rep["run_seconds"] = seconds
    rep["seconds"] = round(time.time() - started, 1)
    out = Path(args.json_out) if args.json_out else Path(args.workdir) / name / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=2) + "\n")
    print(f"\nreport: {out}", flush=True)
    try:
        print(f"report: {write_evaluation_report(OutputFolder(str(out.parent), storage), rep, outputs)}", flush=True)
    except Exception as exc:  # noqa: BLE001 - the figures are written; the page is a view of them
        print(f"warning: no {REPORT_FILE} written ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
    return rep
