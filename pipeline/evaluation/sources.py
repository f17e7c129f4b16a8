"""The query shards an evaluation annotates: the synthetic world's held-out suite, or official
evaluation files converted to query rows; and how much of the suite's gold the corpus holds."""

from __future__ import annotations

from pathlib import Path

from ..infra.config import Config
from ..infra.io import Storage
from . import layouts, log, synthetic


def prepare_synthetic(root: Path, modes: list[str], world_seed: int, max_per_kind: int | None, seed: int,
                      split: str) -> tuple[synthetic.Suite, dict[str, list[str]]]:
    """The suite (in memory) and, per mode, its input shards under ``root/queries`` (the probes
    go only to ``always``); ``write_synthetic`` writes them. ``max_per_kind``: at most that many
    questions of each kind (None: all)."""
    from ..synthetic.world import build_world

    world = build_world(seed=world_seed)
    suite = synthetic.build_suite(world, max_per_kind, seed, split)
    kinds = {k: sum(r["kind"] == k for r in suite.plain) for k in synthetic.KINDS}
    log(f"synthetic world seed {world_seed}, split {split}: {kinds['knowledge']} knowledge + "
        f"{kinds['no_knowledge']} no-knowledge + {kinds['long_form']} long-form questions, "
        f"{len(suite.probes)} probe rows")
    for reason in suite.skipped:
        log(f"no probes for {reason}")
    plain, probes = str(root / "queries" / "plain.parquet"), str(root / "queries" / "probes.parquet")
    return suite, {mode: [plain] + ([probes] if mode == "always" else []) for mode in modes}


def write_synthetic(storage: Storage, suite: synthetic.Suite, root: Path) -> None:
    """The suite's plain rows and probes as the two query shards under ``root/queries``."""
    storage.write_parquet_atomic(synthetic.suite_table(suite.plain), str(root / "queries" / "plain.parquet"))
    storage.write_parquet_atomic(synthetic.suite_table(suite.probes), str(root / "queries" / "probes.parquet"))
    log(f"query shards -> {root / 'queries'}")


def load_queries(storage: Storage, paths: list[str], layout: str,
                 task: str | None) -> list[tuple[str, list[dict]]]:
    """Every evaluation file of ``paths`` read and converted, as (shard name, query rows); all
    problems raise (``layouts.LayoutError``) before any work."""
    files = layouts.expand(storage, paths)
    loaded = []
    for path, shard in zip(files, layouts.shard_names(files)):
        found, rows = layouts.load_file(storage, path, layout, task)
        tasks = sorted({r["task"] or "free-form" for r in rows})
        log(f"{path}: {len(rows)} rows, layout {found}, tasks {tasks}")
        loaded.append((shard, rows))
    return loaded


def gold_in_corpus(cfg: Config, storage: Storage, rows: list[dict]) -> float | None:
    """Share of the suite's gold passages present (same id and text) in the retrieval corpus;
    None when the corpus cannot be read or is too large to check here."""
    from ..retrieval.corpus import read_corpus

    wanted = {(r.get("gold_passage_id"), r["ctxs"][0].get("text")) for r in rows
              if r.get("probe") == "gold" and r.get("ctxs")}
    if not wanted:
        return None
    try:
        fs, path = storage.filesystem(cfg.retrieval.corpus)
        if fs.size(path) > 200 << 20:
            return None
        table = read_corpus(storage, cfg.retrieval.corpus)
    except Exception:  # noqa: BLE001 - the annotation job reports an unusable corpus itself
        return None
    have = set(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))
    share = len(wanted & have) / len(wanted)
    if share < 1:
        log(f"warning: {len(wanted - have)} of {len(wanted)} gold passages of the suite are not in "
            f"{cfg.retrieval.corpus}: retrieval from the index cannot find them")
    return round(share, 4)
