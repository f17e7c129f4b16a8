"""Evaluate Self-RAG annotation: accuracy, retrieval rate, error rows and reflection-token probes.

    python -m jobs.evaluate [--synthetic | --queries FILE ... | --annotated PATH ...]
                            [--modes adaptive,never,always] [--config FILE ...] [options] [key=value ...]

Sources (one kind; the synthetic suite when none is given):

  --synthetic        the synthetic world's held-out suite (pipeline/evaluation/synthetic.py):
                     held-out knowledge, no-knowledge and long-form (task asqa) questions (at
                     most --max-per-kind of each) plus probe rows (gold, unrelated and counterfactual passages as ctxs),
                     annotated once per mode; prints the figures below.
  --queries FILE     official Self-RAG evaluation files (JSON Lines, JSON list or Parquet, local
                     or s3://; repeatable; a directory means its files): converted to query
                     shards (pipeline/evaluation/layouts.py), annotated once per mode, scored.
  --annotated PATH   output directories of earlier annotation runs (local or s3://; repeatable):
                     scored as they are, nothing is annotated; each is labelled with the mode of
                     its _config.yaml. Outputs of a synthetic evaluation get the synthetic report.

Annotation runs go through jobs.annotate in this process (one local Ray, one run per mode) with
the --config files and key=value overrides, and with input.paths, output.path, selfrag.mode,
output.keep_logprobs=true and output.overwrite set by this job. Working files go under
{workdir}/{name}/: queries/ (the converted or generated query shards), one output directory per
mode, and report.json.

Accuracy: free-form tasks use the paper's match metric (a gold string occurs in the answer;
case-insensitive substring after stripping both); fever and arc_c use exact accuracy after
normalisation (fever: lowercase "true"/"false"; arc_c: the letter), or with
--closed-set-metric substring the evaluation scripts' case-sensitive substring test (their
--metric match, which the paper's Table 2 used for PubHealth and ARC). Error rows count as wrong.
Retrieval rate: retrieved rows over rows with a retrieval decision.

The synthetic report's JSON keys (all rates are fractions in [0, 1], null when not measured):
  accuracy_{adaptive,never,always}     held-out knowledge questions (match)
  accuracy_<mode>_no_knowledge, accuracy_<mode>_long_form (any gold value), accuracy_<mode>_all
  retrieval_rate_knowledge, retrieval_rate_no_knowledge   adaptive run
  retrieval_rate_<mode>_<kind>, error_rows_<mode>
  retrieval_decision_right  adaptive run, knowledge and no-knowledge questions: retrieved exactly
                            for the knowledge ones (_first_token: as the model's own first token
                            decides, retrieval_prob > 0.5, whatever selfrag.threshold)
  relevant_on_gold          always run, ctxs=[gold passage]: first generated token is [Relevant]
  irrelevant_on_unrelated   always run, ctxs=[another entity's passage]: first token [Irrelevant]
  counterfactual_follow_rate    ctxs=[gold passage with the asked value swapped]: the answer
                                contains the swapped value (counterfactual_original_rate: the
                                original one)
  accuracy_with_gold_ctx    gold-passage probe rows: match accuracy
  gold_ranked_first         always run, index retrieval, knowledge rows: best_passage_id is the
                            gold passage (gold_in_top_k: gold among the passages;
                            gold_retrieved_first: the index ranked it first;
                            gold_ranked_first_adaptive: the same over adaptive rows that retrieved)
  well_formed_rate          chosen generations ending with [Utility:k] then end of sequence, from
                            the rows' answer_token_ids; well_formed_checked / well_formed_unchecked
                            count the generations with / without recorded token ids (long-form
                            rows record none); well_formed_text_proxy_unchecked is the share of
                            those whose raw text ends with [Utility:k]
  retrieval_rate_long_form  adaptive run, long-form rows (two facts of one entity, task asqa)
  long_form_accuracy        long-form rows whose answer contains every gold value
                            (accuracy_<mode>_long_form: at least one)
  long_form_two_segments    long-form rows answered in two or more (kept) segments
  long_form_depth_two       long-form rows whose chosen path has two or more segments before
                            empty and repeated ones are dropped (path_depth >= 2)
  long_form_citations_valid every [n] of a row's segments names docs[n-1], its own passage,
                            numbered in order of first citation
  long_form_gold_cited      retrieving long-form rows whose docs include the gold passage
  long_form_error_rows      long-form rows with an error (they count as failures above)
  gold_in_corpus            share of the gold passages present (same id and text) in
                            retrieval.corpus (gold_in_top_k cannot exceed it)
  n_knowledge, n_no_knowledge, n_long_form, n_probe_{gold,unrelated,counterfactual}, seconds, run_seconds
For --queries and --annotated: accuracy_<mode>, retrieval_rate_<mode>, error_rows_<mode>,
rows_<mode>, per_task, and the well_formed_* keys.

The last line printed is the report as one JSON object. Exit codes: 0 done; 2 refused before
any work (bad option, config, file or layout); 1 an annotation run did not complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa

from jobs.report import write_evaluation_report
from pipeline import io
from pipeline.config import Config, ConfigError, load_config
from pipeline.console import print_error
from pipeline.evaluation import layouts, synthetic
from pipeline.evaluation.metrics import CLOSED_METRICS, TokenInfo, report_runs
from pipeline.io import InputError
from pipeline.preflight import PreflightError
from pipeline.ray_connect import stop_ray
from pipeline.run_log import RunLog

MODES = synthetic.MODES
#: Config keys this job sets itself; overriding them is refused.
OWN_KEYS = ("input.paths", "output.path", "selfrag.mode", "output.keep_logprobs", "output.overwrite")
#: Defaults of this job's annotation runs (before the user's overrides): no progress bars, and
#: vLLM's own start-up logging at WARNING, so the progress lines stay readable.
QUIET = ("ray.progress_bars=false", "engine.env.VLLM_LOGGING_LEVEL=WARNING")


class EvalError(ValueError):
    """A bad option or input: refused before any work, exit code 2."""


def log(message: str) -> None:
    print(f"[evaluate] {message}", flush=True)


# ----------------------------------------------------------------------------- arguments

def parse_modes(text: str) -> list[str]:
    """``"adaptive,never"`` -> ``["adaptive", "never"]``; EvalError for unknown or repeated modes."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown or len(set(modes)) != len(modes):
        raise EvalError(f"--modes {text!r}: give distinct modes among {list(MODES)}, comma-separated")
    return modes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--synthetic", action="store_true",
                        help="evaluate on the synthetic world's held-out suite (the default source)")
    source.add_argument("--queries", action="append", metavar="FILE",
                        help="an official evaluation file or a directory of them (repeatable)")
    source.add_argument("--annotated", action="append", metavar="PATH",
                        help="an annotated output directory to score as it is (repeatable)")
    parser.add_argument("--format", choices=layouts.FORMATS, default="auto",
                        help="layout of the --queries files: qa (question/instruction + answers/output), "
                             "arc (choices/answerKey), pubhealth (claim/label); auto (default) detects "
                             "it from the first record's keys")
    parser.add_argument("--task", default=None, metavar="TASK",
                        help="task of qa-layout rows that name none (e.g. popqa, triviaqa, fever); "
                             "default: none (free-form)")
    parser.add_argument("--closed-set-metric", choices=CLOSED_METRICS, default="exact",
                        help="how fever and arc_c answers are scored: exact (accuracy after "
                             "normalising; default) or substring (the evaluation scripts' --metric "
                             "match, with which the paper's Table 2 was computed)")
    parser.add_argument("--modes", default=None, metavar="M1,M2",
                        help=f"retrieval modes to annotate with, in order (default: {','.join(MODES)}); "
                             "the synthetic probes need 'always'")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="annotation config preset (repeatable; later files win), e.g. conf/demo.yaml")
    parser.add_argument("--workdir", default="outputs/eval", metavar="DIR",
                        help="local directory for working files (default: outputs/eval)")
    parser.add_argument("--name", default=None,
                        help="subdirectory of --workdir for this evaluation (default: 'synthetic', or "
                             "the first --queries file's name)")
    parser.add_argument("--split", default="heldout", choices=("heldout", "train"),
                        help="synthetic: question split (default: heldout)")
    parser.add_argument("--world-seed", type=int, default=0, help="synthetic: build_world seed (default: 0)")
    parser.add_argument("--seed", type=int, default=0,
                        help="synthetic: seed of the question sample and the probes' passage and "
                             "value picks (default: 0)")
    parser.add_argument("--max-per-kind", type=int, default=200, metavar="N",
                        help="synthetic: at most N questions of each kind, sampled with --seed; "
                             "0 means all (default: 200; the held-out split has about 2,100 "
                             "knowledge and 82 no-knowledge questions)")
    parser.add_argument("--resume", action="store_true",
                        help="keep earlier outputs of the same evaluation and config: shards already "
                             "annotated are not redone (default: annotate afresh)")
    parser.add_argument("--json-out", default=None, metavar="FILE",
                        help="also write the report here (default: {workdir}/{name}/report.json)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="annotation config overrides, applied after --config")
    return parser


def check_overrides(overrides: list[str]) -> None:
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


# ----------------------------------------------------------------------------- reading

def read_output(path: str) -> list[dict]:
    """All rows of an annotated output location (every ``*.parquet`` below it)."""
    tables = [io.read_table(shard) for shard in io.list_shards([path])]
    return pa.concat_tables(tables, promote_options="permissive").to_pylist()


def output_mode(path: str, rows: list[dict]) -> str | None:
    """The retrieval mode of an output location: ``selfrag.mode`` of its ``_config.yaml`` (or
    ``config.yaml``), else read from the rows (``retrieval_prob`` recorded: adaptive; every valid
    row retrieved: always; none: never); None when undecidable."""
    from omegaconf import OmegaConf

    for name in ("_config.yaml", "config.yaml"):
        try:
            return str(OmegaConf.create(io.read_text(io.join(path, name))).selfrag.mode)
        except Exception:  # noqa: BLE001 - no or odd config: try the next clue
            continue
    decided = [r for r in rows if r.get("retrieved") is not None]
    if not decided:
        return None
    if any(r.get("retrieval_prob") is not None for r in decided):
        return "adaptive"
    if all(r["retrieved"] for r in decided):
        return "always"
    return "never" if not any(r["retrieved"] for r in decided) else None


def token_info(model: str | None) -> TokenInfo | None:
    """Reflection and end-of-sequence token ids from the model's tokenizer (None, with a note,
    when it cannot be loaded: the probes then read the candidates' raw text)."""
    if not model:
        return None
    try:
        from transformers import AutoTokenizer, GenerationConfig

        from pipeline.selfrag.tokens import IRRELEVANT, ISUSE_GROUP, RELEVANT, ReflectionIds

        from pipeline.tokenizer import TOKENIZER_FILES

        local = io.localize(model, only=TOKENIZER_FILES)
        tok = AutoTokenizer.from_pretrained(local)
        ids = ReflectionIds.from_lookup(tok.convert_tokens_to_ids, tok.unk_token_id)
        eos = {tok.eos_token_id} - {None}
        try:
            extra = GenerationConfig.from_pretrained(local).eos_token_id
            eos |= set(extra if isinstance(extra, list) else [extra]) - {None}
        except Exception:  # noqa: BLE001 - no generation config: the tokenizer's eos only
            pass
        return TokenInfo(relevant=ids[RELEVANT], irrelevant=ids[IRRELEVANT],
                         utility=tuple(ids.ids(ISUSE_GROUP)), eos=tuple(sorted(eos)))
    except Exception as exc:  # noqa: BLE001
        log(f"note: cannot load the tokenizer of {model!r} ({type(exc).__name__}: {exc}); "
            "probes read raw text and well_formed_rate is not measured")
        return None


# ----------------------------------------------------------------------------- running

def prepare_synthetic(args, root: Path) -> tuple[synthetic.Suite, dict[str, list[str]]]:
    """The suite (in memory) and, per mode, its input shards under ``root/queries`` (the probes
    go only to ``always``); ``write_synthetic`` writes them."""
    from pipeline.synthetic.world import build_world

    world = build_world(seed=args.world_seed)
    suite = synthetic.build_suite(world, args.max_per_kind or None, args.seed, args.split)
    kinds = {k: sum(r["kind"] == k for r in suite.plain) for k in synthetic.KINDS}
    log(f"synthetic world seed {args.world_seed}, split {args.split}: {kinds['knowledge']} knowledge + "
        f"{kinds['no_knowledge']} no-knowledge + {kinds['long_form']} long-form questions, "
        f"{len(suite.probes)} probe rows")
    for reason in suite.skipped:
        log(f"no probes for {reason}")
    plain, probes = str(root / "queries" / "plain.parquet"), str(root / "queries" / "probes.parquet")
    return suite, {mode: [plain] + ([probes] if mode == "always" else []) for mode in args.modes}


def write_synthetic(suite: synthetic.Suite, root: Path) -> None:
    io.write_parquet_atomic(synthetic.suite_table(suite.plain), str(root / "queries" / "plain.parquet"))
    io.write_parquet_atomic(synthetic.suite_table(suite.probes), str(root / "queries" / "probes.parquet"))
    log(f"query shards -> {root / 'queries'}")


def load_queries(args) -> list[tuple[str, list[dict]]]:
    """Every --queries file read and converted (all problems raise before any work)."""
    files = layouts.expand(args.queries)
    loaded = []
    for path, shard in zip(files, layouts.shard_names(files)):
        layout, rows = layouts.load_file(path, args.format, args.task)
        tasks = sorted({r["task"] or "free-form" for r in rows})
        log(f"{path}: {len(rows)} rows, layout {layout}, tasks {tasks}")
        loaded.append((shard, rows))
    return loaded


def gold_in_corpus(cfg: Config, rows: list[dict]) -> float | None:
    """Share of the suite's gold passages present (same id and text) in the retrieval corpus;
    None when the corpus cannot be read or is too large to check here."""
    from pipeline.retrieval.corpus import read_corpus

    wanted = {(r.get("gold_passage_id"), r["ctxs"][0].get("text")) for r in rows
              if r.get("probe") == "gold" and r.get("ctxs")}
    if not wanted:
        return None
    try:
        fs, path = io.filesystem(cfg.retrieval.corpus)
        if fs.size(path) > 200 << 20:
            return None
        table = read_corpus(cfg.retrieval.corpus)
    except Exception:  # noqa: BLE001 - the annotation job reports an unusable corpus itself
        return None
    have = set(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))
    share = len(wanted & have) / len(wanted)
    if share < 1:
        log(f"warning: {len(wanted - have)} of {len(wanted)} gold passages of the suite are not in "
            f"{cfg.retrieval.corpus}: retrieval from the index cannot find them")
    return round(share, 4)


def annotate_all(configs: dict[str, Config], resume: bool) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """Preflight every run (nothing runs if one is refused), then annotate mode by mode."""
    from jobs.annotate import run
    from pipeline.preflight import preflight

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
        runs[mode] = read_output(str(out))
        this = manifest["this_run"]
        log(f"run {n}/{len(configs)} done in {seconds[mode]} s: {len(runs[mode])} rows "
            f"({this['rows']} annotated now), {sum(r['error'] is not None for r in runs[mode])} error rows")
    return runs, seconds


# ----------------------------------------------------------------------------- printing

def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def print_synthetic(rep: dict, modes: list[str]) -> None:
    cols = [m for m in MODES if m in modes] + [m for m in modes if m not in MODES]
    head = f"{'':34s}" + "".join(f"{m:>11s}" for m in cols)
    print(f"\nheld-out questions ({rep['n_knowledge']} knowledge, {rep['n_no_knowledge']} no-knowledge, "
          f"{rep.get('n_long_form', 0)} long-form; match accuracy)")
    print(head)
    lines = [("accuracy, knowledge", "accuracy_{m}"), ("accuracy, no-knowledge", "accuracy_{m}_no_knowledge"),
             ("accuracy, all", "accuracy_{m}_all"), ("retrieval rate, knowledge", "retrieval_rate_{m}_knowledge"),
             ("retrieval rate, no-knowledge", "retrieval_rate_{m}_no_knowledge"),
             ("accuracy, long-form (any value)", "accuracy_{m}_long_form"),
             ("retrieval rate, long-form", "retrieval_rate_{m}_long_form")]
    for label, key in lines:
        print(f"{label:34s}" + "".join(f"{pct(rep.get(key.format(m=m))):>11s}" for m in cols))
    print(f"{'error rows':34s}" + "".join(f"{str(rep.get(f'error_rows_{m}')):>11s}" for m in cols))
    print(f"retrieval decision right (adaptive): {pct(rep.get('retrieval_decision_right'))} at the run's threshold, "
          f"{pct(rep.get('retrieval_decision_right_first_token'))} by the model's first token (P > 0.5)")
    print(f"\nprobes (mode always, one passage per row; {rep['n_probe_gold']} gold, "
          f"{rep['n_probe_unrelated']} unrelated, {rep['n_probe_counterfactual']} counterfactual; "
          f"read from {rep['probe_basis']})")
    probes = [
        ("relevant_on_gold", "gold passage: first token [Relevant]"),
        ("irrelevant_on_unrelated", "another entity's passage: first token [Irrelevant]"),
        ("accuracy_with_gold_ctx", "gold passage: answer matches the gold"),
        ("counterfactual_follow_rate", "swapped value: answer has the swapped value"),
        ("counterfactual_original_rate", "swapped value: answer has the original value"),
        ("gold_ranked_first", "index top-k, always: best passage is the gold one"),
        ("gold_in_top_k", "index top-k, always: gold passage retrieved"),
        ("gold_retrieved_first", "index top-k, always: index ranked gold first"),
        ("gold_in_corpus", "gold passages present in retrieval.corpus"),
        ("gold_ranked_first_adaptive", "index top-k, adaptive rows that retrieved"),
    ]
    for key, what in probes:
        print(f"  {key:30s} {pct(rep.get(key)):>7s}  {what}")
    print(f"\nlong-form questions (task asqa, adaptive run, tree decoding; {rep.get('n_long_form', 0)} rows)")
    long_form = [
        ("long_form_accuracy", "answer has both gold values"),
        ("long_form_two_segments", "answered in two or more segments"),
        ("long_form_depth_two", "path of depth >= 2 (repeated segments included)"),
        ("long_form_citations_valid", "every [n] names docs[n-1], its own passage"),
        ("long_form_gold_cited", "gold passage among the cited docs"),
    ]
    print(f"  {'long_form_error_rows':30s} {str(rep.get('long_form_error_rows')):>7s}  rows that failed (counted as wrong)")
    for key, what in long_form:
        print(f"  {key:30s} {pct(rep.get(key)):>7s}  {what}")
    print(f"\nwell-formed generations ([Utility:k] then end of sequence, from token ids): "
          f"{pct(rep['well_formed_rate'])} of {rep['well_formed_checked']} (always run: "
          f"{pct(rep['well_formed_rate_always'])}); {rep['well_formed_unchecked']} without recorded token ids")


def print_generic(rep: dict) -> None:
    print(f"\n{'run':10s} {'task':12s} {'metric':7s} {'rows':>6s} {'errors':>7s} {'scored':>7s} "
          f"{'accuracy':>9s} {'retrieval':>10s}")
    for label, tasks in rep["per_task"].items():
        for task, s in tasks.items():
            print(f"{label:10s} {task:12s} {s['metric'] or '-':7s} {s['rows']:6d} {s['errors']:7d} "
                  f"{s['scored']:7d} {pct(s['accuracy']):>9s} {pct(s['retrieval_rate']):>10s}")
        print(f"{label:10s} {'(overall)':12s} {'':7s} {rep[f'rows_{label}']:6d} {rep[f'error_rows_{label}']:7d} "
              f"{'':7s} {pct(rep[f'accuracy_{label}']):>9s} {pct(rep[f'retrieval_rate_{label}']):>10s}")
    print(f"\nwell-formed generations: {pct(rep['well_formed_rate'])} of {rep['well_formed_checked']} "
          f"with token ids; {rep['well_formed_unchecked']} without")


# ----------------------------------------------------------------------------- main

def evaluate(args) -> dict:
    """Do the evaluation the parsed arguments ask for; returns the report."""
    started = time.time()
    check_overrides(args.overrides)
    if args.max_per_kind < 0:
        raise EvalError(f"--max-per-kind {args.max_per_kind}: give 0 (all) or a positive number")
    cfg = load_config(args.config, [*QUIET, *args.overrides])
    io.configure(cfg.storage)
    if args.annotated:
        if args.modes:
            raise EvalError("--modes applies when annotating; --annotated scores existing outputs")
        runs, outputs = {}, {}
        for i, path in enumerate(args.annotated):
            rows = read_output(path)
            label = output_mode(path, rows) or f"run{i + 1}"
            label = label if label not in runs else f"{label}{i + 1}"
            runs[label], outputs[label] = rows, path
            log(f"{path}: {len(rows)} rows (label {label})")
        seconds: dict[str, float] = {}
        model = next((r.get("model") for rows in runs.values() for r in rows if r.get("model")), None)
        args.modes = list(runs)
        name = args.name or "annotated"
    else:
        args.modes = parse_modes(args.modes or ",".join(MODES))
        if args.queries:
            loaded = load_queries(args)  # every file checked before anything is written
            name = args.name or loaded[0][0][: -len(".parquet")]
            root = Path(args.workdir) / name
            paths = [str(root / "queries" / shard) for shard, _ in loaded]
            configs = run_configs(args, {mode: paths for mode in args.modes}, root)
            if not args.resume and (root / "queries").exists():
                shutil.rmtree(root / "queries")
            for (_, rows), path in zip(loaded, paths):
                io.write_parquet_atomic(layouts.query_table(rows), path)
        else:
            name = args.name or "synthetic"
            root = Path(args.workdir) / name
            suite, inputs = prepare_synthetic(args, root)
            configs = run_configs(args, inputs, root)
            write_synthetic(suite, root)
        runs, seconds = annotate_all(configs, args.resume)
        outputs = {mode: c.output.path for mode, c in configs.items()}
        model = cfg.engine.model
    tokens = token_info(model)
    synthetic_rows = any(r.get("probe") is not None for rows in runs.values() for r in rows)
    if synthetic_rows or (not args.annotated and not args.queries):
        rep = synthetic.report(runs, tokens)
        rep["gold_in_corpus"] = gold_in_corpus(cfg, [r for rows in runs.values() for r in rows])
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
        print(f"report: {write_evaluation_report(str(out.parent), rep, outputs)}", flush=True)
    except Exception as exc:  # noqa: BLE001 - the figures are written; the page is a view of them
        print(f"warning: no report.html written ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
    return rep


def main(argv: list[str] | None = None) -> int:
    """Entrypoint: returns the exit code (2: refused before any work; 1: incomplete run)."""
    from jobs.annotate import IncompleteRun

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    # A quiet console, as for the annotation job; the log goes to {workdir}/_logs/.
    run_log = RunLog("debug" if "log_level=debug" in args.overrides else "info")
    run_log.start()
    refused = False
    try:
        rep = evaluate(args)
    except (EvalError, layouts.LayoutError, ConfigError, InputError, PreflightError) as exc:
        refused = True
        print_error(exc)
        return 2
    except IncompleteRun as exc:
        print_error(exc)
        return 1
    finally:
        stop_ray()  # a local Ray this job started goes down with all its processes
        saved = run_log.close(None if refused else args.workdir)
        if saved:
            print(f"log: {saved}", flush=True)
    print(json.dumps(rep), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
