"""Annotated outputs read back for scoring, and the retrieval mode of each."""

from __future__ import annotations

import pyarrow as pa

from ..output.folder import OutputFolder


def read_output(output: OutputFolder) -> list[dict]:
    """All rows of an annotated output location (every ``*.parquet`` below it)."""
    tables = [output.storage.read_table(shard) for shard in output.list_shards()]
    return pa.concat_tables(tables, promote_options="permissive").to_pylist()


def output_mode(output: OutputFolder, rows: list[dict]) -> str | None:
    """The retrieval mode of an output location: ``selfrag.mode`` of its ``_config.yaml`` (or
    ``config.yaml``), else read from the rows (``retrieval_prob`` recorded: adaptive; every valid
    row retrieved: always; none: never); None when undecidable."""
    from omegaconf import OmegaConf

    for path in (output.config_file, output.other_config_file):
        try:
            return str(OmegaConf.create(output.read_text(path)).selfrag.mode)
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
