"""The embedded demo data (data/demo): the synthetic world's passages as a corpus, and two query
shards of held-out questions, claims, choices and rows with their own passages (``python -m
jobs.make_demo_assets``). Everything derives from the world and the seed: byte-identical files
on every run."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .world import (
    KNOWLEDGE_FRAMES, Entity, World, attribute_spec, fact_sentence, passage_id, question_text)

SOURCE = "synthetic-world"

PASSAGE_TYPE = pa.struct([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])
CORPUS_SCHEMA = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])
QUERY_SCHEMA = pa.schema([
    ("id", pa.string()), ("instruction", pa.string()), ("input", pa.string()),
    ("task", pa.string()), ("answers", pa.list_(pa.string())),
    ("ctxs", pa.list_(PASSAGE_TYPE)), ("source", pa.string()),
])

def query_row(qid: str, instruction: str, answers: list[str], *, input: str | None = None,
              task: str | None = None, ctxs: list[dict] | None = None) -> dict:
    """Return one demo query row with every column of QUERY_SCHEMA."""
    return {"id": qid, "instruction": instruction, "input": input, "task": task,
            "answers": answers, "ctxs": ctxs, "source": SOURCE}


def fever_row(rng: random.Random, world: World, entity: Entity, true: bool) -> dict:
    """A PubHealth-style row: a true or false claim about ``entity``, answer "true"/"false"."""
    attr = rng.choice(list(entity.attributes))
    value = entity.attributes[attr]
    if not true:
        pool = world.pools[attribute_spec(entity.type, attr).pool]
        value = rng.choice([v for v in pool if v != value])
    claim = fact_sentence(entity, attr, value)
    return query_row(f"fever-{entity.id}-{attr}", claim, ["true" if true else "false"],
                     task="fever")


def arc_row(rng: random.Random, world: World, entity: Entity, letter: str) -> dict:
    """An ARC-style row: a question with four lettered choices, gold at ``letter``."""
    attr = rng.choice(list(entity.attributes))
    gold = entity.attributes[attr]
    spec = attribute_spec(entity.type, attr)
    choices = rng.sample([v for v in world.pools[spec.pool] if v != gold], 3)
    choices.insert("ABCD".index(letter), gold)
    question = question_text(entity, attr, KNOWLEDGE_FRAMES["heldout"][0])
    lines = [question] + [f"{x}: {c}" for x, c in zip("ABCD", choices)]
    return query_row(f"arc_c-{entity.id}-{attr}", "\n".join(lines), [letter], task="arc_c")


def demo_rows(world: World, seed: int = 0) -> list[dict]:
    """Pick the 40 demo queries: held-out knowledge and no-knowledge questions, 2 long-form
    (``asqa``) questions, 3 rows with pre-supplied ctxs, 2 ``fever`` rows, 2 ``arc_c`` rows and
    1 row with input."""
    rng = random.Random(seed)
    entities = rng.sample(world.entities, 30)
    by_entity = {}
    for q in world.questions(split="heldout", kind="knowledge"):
        by_entity.setdefault(q["gold_passage_id"], []).append(q)
    picked = [rng.choice(by_entity[passage_id(e)]) for e in entities[:26]]

    rows = [query_row(q["id"], q["instruction"], q["answers"]) for q in picked[:20]]
    for e in entities[20:22]:  # long-form: two facts, decoded as a tree (one segment per fact)
        q = rng.choice([x for x in world.questions(split="heldout", kind="long_form")
                        if x["gold_passage_id"] == passage_id(e)])
        rows.append(query_row(q["id"], q["instruction"], q["answers"], task=q["task"]))
    for q in picked[22:25]:  # pre-supplied evidence: gold passage plus an unrelated one
        gold = world.passage_by_id(q["gold_passage_id"])
        other = rng.choice([p for p in world.passages if p["id"] != gold["id"]])
        ctxs = [gold, other] if rng.random() < 0.5 else [other, gold]
        rows.append(query_row(q["id"], q["instruction"], q["answers"], ctxs=ctxs))
    q = picked[25]
    rows.append(query_row(q["id"], "Answer the following question.", q["answers"],
                          input=q["instruction"]))

    no_knowledge = world.questions(split="heldout", kind="no_knowledge")
    for prefix, count in (("greet-", 2), ("add-", 4), ("repeat-", 4)):
        group = [x for x in no_knowledge if x["id"].startswith(prefix)]
        rows += [query_row(x["id"], x["instruction"], x["answers"])
                 for x in rng.sample(group, count)]

    rows += [fever_row(rng, world, entities[26], True), fever_row(rng, world, entities[27], False)]
    rows += [arc_row(rng, world, entities[28], "B"), arc_row(rng, world, entities[29], "D")]
    rng.shuffle(rows)
    return rows


def write_demo_data(world: World, out_data: Path, seed: int = 0) -> list[Path]:
    """Write ``corpus.parquet`` and two query shards under ``out_data``; return the paths."""
    (out_data / "queries").mkdir(parents=True, exist_ok=True)
    corpus = out_data / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(world.passages, schema=CORPUS_SCHEMA), corpus)
    rows = demo_rows(world, seed)
    half = len(rows) // 2
    paths = [corpus]
    for i, shard in enumerate((rows[:half], rows[half:])):
        path = out_data / "queries" / f"part-{i:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(shard, schema=QUERY_SCHEMA), path)
        paths.append(path)
    return paths
