"""What the annotation job prints at the end of a run: the summary and example annotations."""

from __future__ import annotations

from ..output.folder import OutputFolder


def print_summary(manifest: dict) -> None:
    """The short human summary printed at the end of a run."""
    this_run = manifest["this_run"]
    rows = this_run["rows"]
    rate = f"{this_run['retrieved'] / rows:.1%}" if rows else "n/a"
    print(
        f"\ndone: {rows} rows in {this_run['shards']} shard(s), retrieval rate {rate}, "
        f"{this_run['errors']} error row(s), {this_run['rows_per_s']} rows/s; "
        f"{len(manifest['skipped_done'])} shard(s) skipped as already done, "
        f"{len(manifest['skipped_bad'])} as unreadable\noutput: {manifest['output']}",
        flush=True,
    )


def print_examples(output: OutputFolder, question: str, n: int, scan_rows: int = 5000) -> None:
    """``n`` example annotations of the output (from its first shards, at most ``scan_rows`` rows
    read), each with its question (column ``question``)."""
    from ..report import examples

    rows: list[dict] = []
    for shard in output.list_shards():
        rows += output.storage.read_columns(shard, (*examples.COLUMNS, question)).to_pylist()
        if len(rows) >= scan_rows:
            break
    chosen = examples.pick(rows, n)
    if chosen:
        print(f"\n{len(chosen)} example annotation(s):")
    for i, row in enumerate(chosen, 1):
        print(f"\n{i}. {examples.describe(row, row.get(question) or '')}", flush=True)
