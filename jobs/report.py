"""Run report: ``python -m jobs.report OUTPUT`` writes ``OUTPUT/report.html``.

One self-contained page (plots inline, nothing fetched when it is viewed) for an annotated
output, local or ``s3://``: counts (rows, errors by type, retrieval rate by task), the
distributions of the retrieval probability, of s_rel / s_sup / s_use / final over every
candidate, of the winning passage's rank, of answer length, of long-form depth and citations,
the stage timeline and rows written over time (from ``_manifest.json``), and the runs reported
earlier in the same location with their change (``_history.json``, appended by each report).
The annotation job writes it at the end of every run and the evaluation job for its outputs.

Reads the output shard by shard, a few columns each: memory stays bounded by the plots' bins.
Exit codes: 0 written; 2 the location is not an annotated output.
"""

from __future__ import annotations

import argparse

from pipeline.infra.config import StorageConfig
from pipeline.infra.io import InputError, Storage
from pipeline.output.folder import OutputFolder
from pipeline.report.write import ReportError, write_report
from pipeline.run.exit_codes import end_job
from pipeline.runtime.process_exit import exit_process


def main(argv: list[str] | None = None) -> int:
    """Entrypoint: returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="an annotated output location (local path or s3://...)")
    parser.add_argument("--endpoint-url", default=None,
                        help="S3-compatible endpoint for s3:// locations (credentials: the AWS chain)")
    args = parser.parse_args(argv)
    output = OutputFolder(args.output, Storage(StorageConfig(endpoint_url=args.endpoint_url)))
    try:
        print(f"report: {write_report(output)}")
    except (ReportError, InputError) as exc:
        return end_job(exc)
    return 0


if __name__ == "__main__":
    exit_process(main())
