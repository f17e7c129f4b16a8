"""Annotate Parquet shards of questions with Self-RAG.

    python -m jobs.annotate [--config FILE ...] [key=value ...]

Works locally (starts a local Ray) and as a ``ray job submit`` entrypoint (joins the cluster).
Writes one Parquet file per input shard, a success marker per shard (``_done/``),
``_config.yaml`` and ``_manifest.json`` to ``output.path``. Shards already done are skipped
unless ``output.overwrite=true``, so a killed run is resumed by running it again.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.runtime import phase_times
from pipeline.runtime.process_exit import exit_process
from pipeline.infra.config import load_config
from pipeline.output.folder import OutputFolder
from pipeline.run.annotate import run
from pipeline.run.exit_codes import end_job
from pipeline.run.signals import catch_interrupts, restore_signals
from pipeline.run.summary import print_examples, print_summary
from pipeline.output.run_log import RunLog


def parse_args(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(config files, key=value overrides) from the command line."""
    parser = argparse.ArgumentParser(prog="python -m jobs.annotate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML preset (repeatable; later files win)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def main(argv: list[str] | None = None) -> int:
    """Entrypoint: returns the process exit code (``pipeline.run.exit_codes``: 2 refused before
    any work; 1 incomplete or failed run; 128 + the signal's number when interrupted)."""
    phase_times.mark("imports")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    files, overrides = parse_args(argv)
    catch_interrupts()
    cfg, run_log, code = None, None, 0
    try:
        cfg = load_config(files, overrides)
        run_log = RunLog(cfg.log_level)
        run_log.start()
        manifest = run(cfg)
    except (Exception, KeyboardInterrupt) as exc:  # one line on the console; a traceback goes to the run log
        code = end_job(exc, cfg.output.path if cfg is not None else "the output")
        return code
    finally:
        restore_signals()
        if run_log is not None:  # refused before any work: nothing is written to the output
            saved = run_log.close(OutputFolder.of(cfg) if code != 2 else None, cfg.run_id)
            if saved:
                print(f"log: {saved}", flush=True)
    print_summary(manifest)
    if cfg.output.examples:
        print_examples(OutputFolder.of(cfg), cfg.input.question_column, cfg.output.examples)
    return 0


if __name__ == "__main__":
    exit_process(main())
