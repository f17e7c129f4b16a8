"""Export an annotated run as training data: generator, critic and chat SFT datasets with
quality filters, a deterministic train/validation split and a dataset card.

    python -m jobs.export_dataset --run OUTPUT output=DATASET [key=value ...]

``OUTPUT`` is the ``output.path`` of an annotation job (local or s3://); the keys are those of
``pipeline/export/config.py`` (``filters.min_s_rel=0.5``, ``validation_fraction=0.1``,
``never_mode_rows=skip``, ``formats=[parquet]``, ``ray.address=auto``, ...). Also runs as a
``ray job submit`` entrypoint. Refusals print one line, ``error: <message>``, and exit with 2.

Shards are processed in parallel Ray Data tasks, each reading one annotated shard. With
``filters.dedupe`` a first pass emits each kept row's duplicate key; the driver marks later
copies; the second pass converts, filters and writes. The driver writes the card last.
"""

from __future__ import annotations

import argparse

from pipeline.infra.config import ConfigError
from pipeline.export.config import load_export_config
from pipeline.export.source import ExportError
from pipeline.run.exit_codes import end_job
from pipeline.run.export_dataset import export
from pipeline.runtime.process_exit import exit_process


def parse_args(argv: list[str] | None) -> tuple[str, list[str]]:
    """(run location, key=value overrides) from the command line."""
    parser = argparse.ArgumentParser(prog="python -m jobs.export_dataset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, metavar="OUTPUT", help="an annotated run (the job's output.path)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="export config (output=... is required)")
    args = parser.parse_args(argv)
    return args.run, args.overrides


def main(argv: list[str] | None = None) -> int:
    """Entrypoint: returns the exit code (2: refused)."""
    run, overrides = parse_args(argv)
    try:
        summary = export(load_export_config(run, overrides))
    except (ConfigError, ExportError) as exc:
        return end_job(exc)
    c = summary["counts"]
    print(f"exported {c.get('rows_out', 0)} of {c.get('rows_in', 0)} rows (train {c.get('rows_train', 0)}, "
          f"validation {c.get('rows_validation', 0)}) to {summary['config']['output']}", flush=True)
    return 0


if __name__ == "__main__":
    exit_process(main())
