"""The throughput benchmark's workload: questions of the synthetic world in a fixed mix of kinds,
written as Parquet query shards."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..synthetic.world import attribute_spec, build_world, fact_sentence, lexicon

#: Kinds of question and their shares: free-form knowledge and no-knowledge questions,
#: closed-set claims (``fever``), four-choice questions (``arc_c``), two-fact long-form (``asqa``).
MIX = {"knowledge": 0.55, "no_knowledge": 0.10, "fever": 0.10, "arc_c": 0.10, "long_form": 0.15}


def workload(rows: int, seed: int = 0) -> list[dict]:
    """``rows`` questions in the proportions of ``MIX``, interleaved, with unique ids."""
    world, rng = build_world(seed=0), random.Random(seed)
    entities = {e.id: e for e in world.entities}
    knowledge = world.questions(kind="knowledge")
    rng.shuffle(knowledge)
    picks: dict[str, list[dict]] = {}
    picks["knowledge"] = [{"instruction": q["instruction"], "task": None} for q in knowledge]
    nk = world.questions(kind="no_knowledge")
    picks["no_knowledge"] = [{"instruction": q["instruction"], "task": None} for q in nk]
    claims, choices = [], []
    for q in knowledge:
        entity = entities[q["id"].split("-")[0]]
        attr, value = q["attribute"], entity.attributes[q["attribute"]]
        pool = [v for v in lexicon().pools[attribute_spec(entity.type, attr).pool] if v != value]
        shown = value if rng.random() < 0.5 else rng.choice(pool)
        claims.append({"instruction": fact_sentence(entity, attr, shown), "task": "fever"})
        options = rng.sample(pool, 3) + [value]
        rng.shuffle(options)
        lines = "\n".join(f"{letter}: {option}" for letter, option in zip("ABCD", options))
        choices.append({"instruction": f"{q['instruction']}\n{lines}", "task": "arc_c"})
    picks["fever"], picks["arc_c"] = claims, choices
    picks["long_form"] = [{"instruction": q["instruction"], "task": "asqa"} for q in world.questions(kind="long_form")]
    counts = {kind: round(rows * share) for kind, share in MIX.items()}
    counts["knowledge"] += rows - sum(counts.values())
    chosen = []
    for kind, n in counts.items():
        pool = picks[kind]
        chosen += [{"kind": kind, **pool[i % len(pool)]} for i in range(n)]
    rng.shuffle(chosen)
    return [{"id": f"bench-{i:05d}", **row} for i, row in enumerate(chosen)]


def write_shards(dest: Path, rows: list[dict], shards: int) -> None:
    """The rows as ``shards`` Parquet shards under ``dest`` (replaced)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    schema = pa.schema([("id", pa.string()), ("instruction", pa.string()), ("task", pa.string()),
                        ("kind", pa.string())])
    for s in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[s::shards], schema=schema), dest / f"part-{s:05d}.parquet")
