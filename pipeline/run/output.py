"""The output location before a run annotates: what it clears, what it keeps, and the resolved
config it writes (``OutputFolder.config_file``; the manifest is written at the end)."""

from __future__ import annotations

from ..output import staged_rows
from ..infra.config import Config, to_yaml
from ..infra.console import say
from .preflight import Plan


def prepare_output(cfg: Config, plan: Plan) -> None:
    """With the lease held and every check passed: clear what this run replaces (temporary files
    of interrupted writes; old markers and staged rows with ``overwrite``; staged rows of
    another annotation identity, or of input shards replaced since, otherwise), count the rows
    staged by an earlier run, and write the resolved config."""
    output = plan.output
    if cfg.output.overwrite:
        for shard in plan.todo:
            output.remove(output.marker(shard))
    output.remove_temporaries()  # what an interrupted write left
    removed = staged_rows.remove_other_identities(output, None if cfg.output.overwrite else plan.annotation_hash)
    if removed:
        say(f"removed staged rows of other annotation identities: {removed}")
    for shard in plan.todo:
        if staged_rows.discard_if_changed(output, plan.annotation_hash, shard, plan.versions.get(shard)):
            say(f"input shard {shard} changed since an earlier run staged its rows: they are discarded and the "
                "shard is annotated whole")
    plan.staged = {shard: len(staged_rows.staged_offsets(output, plan.annotation_hash, shard))
                   for shard in plan.todo}
    output.write_text(output.config_file, to_yaml(cfg))
