"""Annotated outputs read back for scoring, and the retrieval mode of each."""

from __future__ import annotations

import pyarrow as pa

from ..infra import io
from ..output.names import CONFIG_FILE


def read_output(path: str) -> list[dict]:
    """All rows of an annotated output location (every ``*.parquet`` below it)."""
    tables = [io.read_table(shard) for shard in io.list_shards([path])]
    return pa.concat_tables(tables, promote_options="permissive").to_pylist()


def output_mode(path: str, rows: list[dict]) -> str | None:
    """The retrieval mode of an output location: ``selfrag.mode`` of its ``_config.yaml`` (or
    ``config.yaml``), else read from the rows (``retrieval_prob`` recorded: adaptive; every valid
    row retrieved: always; none: never); None when undecidable."""
    from omegaconf import OmegaConf

    for name in (CONFIG_FILE, "config.yaml"):
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
