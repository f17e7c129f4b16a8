"""The output location before a run annotates: what it clears, what it keeps, and the resolved
config it writes (``CONFIG_FILE``; the manifest is written at the end)."""

from __future__ import annotations

from ..infra import io
from ..output import staged_rows
from ..infra.config import Config, to_yaml
from ..infra.console import say
from ..infra.io import join, write_text
from .preflight import DONE_DIR, Plan, marker_path

from ..output.names import CONFIG_FILE


def prepare_output(cfg: Config, plan: Plan) -> None:
    """With the lease held and every check passed: clear what this run replaces (temporary files
    of interrupted writes; old markers and staged rows with ``overwrite``; staged rows of
    another annotation identity, or of input shards replaced since, otherwise), count the rows
    staged by an earlier run, and write the resolved config."""
    if cfg.output.overwrite:
        for shard in plan.todo:
            io.remove(marker_path(cfg.output.path, shard))
    for directory in (cfg.output.path, join(cfg.output.path, DONE_DIR)):  # what an interrupted write left
        io.remove_temporaries(directory)
    removed = staged_rows.remove_other_identities(cfg.output.path, None if cfg.output.overwrite else plan.annotation_hash)
    if removed:
        say(f"removed staged rows of other annotation identities: {removed}")
    for shard in plan.todo:
        if staged_rows.discard_if_changed(cfg.output.path, plan.annotation_hash, shard, plan.versions.get(shard)):
            say(f"input shard {shard} changed since an earlier run staged its rows: they are discarded and the "
                "shard is annotated whole")
    plan.staged = {shard: len(staged_rows.staged_offsets(cfg.output.path, plan.annotation_hash, shard))
                   for shard in plan.todo}
    write_text(join(cfg.output.path, CONFIG_FILE), to_yaml(cfg))
