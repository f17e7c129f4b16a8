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
any work (bad option, config, file or layout); 1 an annotation run did not complete or failed;
128 + the signal's number when SIGINT or SIGTERM stopped it.
"""

from __future__ import annotations

import argparse
import json
import logging

from pipeline.evaluation import layouts
from pipeline.evaluation.metrics import CLOSED_METRICS
from pipeline.infra.io import Storage
from pipeline.output.folder import OutputFolder
from pipeline.runtime.ray_connect import stop_ray
from pipeline.run.evaluate import MODES, evaluate
from pipeline.run.exit_codes import end_job
from pipeline.run.signals import catch_interrupts, restore_signals
from pipeline.output.run_log import RunLog
from pipeline.runtime.process_exit import exit_process


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m jobs.evaluate``."""
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


def main(argv: list[str] | None = None) -> int:
    """Entrypoint: returns the exit code (``pipeline.run.exit_codes``: 2 refused before any work;
    1 an annotation run did not complete; 128 + the signal's number when interrupted)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    # A quiet console, as for the annotation job; the log goes to {workdir}/_logs/.
    run_log = RunLog("debug" if "log_level=debug" in args.overrides else "info")
    run_log.start()
    catch_interrupts()
    code = 0
    try:
        rep = evaluate(args)
    except (Exception, KeyboardInterrupt) as exc:  # one line on the console; a traceback goes to the run log
        code = end_job(exc, args.workdir)
        return code
    finally:
        restore_signals()
        stop_ray()  # a local Ray this job started goes down with all its processes
        saved = run_log.close(None if code == 2 else OutputFolder(args.workdir, Storage()))  # a local directory
        if saved:
            print(f"log: {saved}", flush=True)
    print(json.dumps(rep), flush=True)
    return 0


if __name__ == "__main__":
    exit_process(main())
