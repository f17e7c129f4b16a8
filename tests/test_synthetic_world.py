"""Tests for the synthetic world and the demo-asset writer (pipeline/synthetic/demo_assets.py,
through ``python -m jobs.make_demo_assets``'s main)."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.make_demo_assets import main as make_demo_assets
from pipeline.synthetic.world import attribute_spec, build_world, lexicon, random_entity

REPO = Path(__file__).resolve().parents[1]
QUERY_COLUMNS = ["id", "instruction", "input", "task", "answers", "ctxs", "source"]
CUE_WORDS = {"is", "in", "speak", "by", "was", "makes", "wrote", "into", "through", "year"}

# Independent of the generator's own guard list on purpose.
ENGLISH = set("""
the and for are but not you all any can had her was one our out day get has him his how man
new now old see two way who boy did its let put say she too use velvet dormant melon lemon
robin denim venom tenor manor minor motor vapor total fatal vital rival canal medal pedal
model label rebel camel medic sonic tonic panic topic lyric toxin basin resin satin demon
talon nylon pylon sonar lunar solar polar radar cedar timer tiger paper liner miner river
water mountain city country person company language export capital founder market island
garden kitten mitten napkin pumpkin goblin muffin button cotton bottom common dragon salmon
torso torrent gallon gorgon kelvin fennel ostrich tavern pellet mirror listen jordan never
""".split())


@pytest.fixture(scope="module")
def world():
    """The default world, built once for the module."""
    return build_world()


def test_same_seed_same_world_different_seed_different_world(world):
    again = build_world(seed=0)
    assert dataclasses.asdict(again) == dataclasses.asdict(world)
    assert json.dumps(again.passages) == json.dumps(world.passages)
    other = build_world(seed=1)
    assert other.passages != world.passages
    assert [e.name for e in other.entities] != [e.name for e in world.entities]


def test_world_size_and_attributes(world):
    assert len(world.entities) == 300 == len(world.passages)
    assert {e.type for e in world.entities} == {"country", "river", "company", "person"}
    assert all(3 <= len(e.attributes) <= 4 for e in world.entities)
    assert len({p["id"] for p in world.passages}) == 300
    assert len(build_world(seed=3, n_entities=20).entities) == 20


def test_names_unique_invented_and_not_english(world):
    words = world.invented_words()
    assert len(words) == len(set(words))
    for word in words:
        assert re.fullmatch(r"[A-Z][a-z]{3,11}", word), word
        assert word.lower() not in ENGLISH, word


def test_worlds_share_the_lexicon_but_not_the_facts():
    # every world draws names and values from the one lexicon (so the tokenizer knows them)
    words = set(lexicon().words())
    for seed in (0, 5):
        assert set(build_world(seed=seed).invented_words()) <= words
    a, b = build_world(seed=0), build_world(seed=5)
    facts = lambda w: {(e.name, k, v) for e in w.entities for k, v in e.attributes.items()}
    assert len(facts(a) & facts(b)) < 0.05 * len(facts(a))


def test_random_entities_are_fresh_and_well_formed():
    rng = random.Random(0)
    entities = [random_entity(rng, f"x{i}") for i in range(200)]
    assert len({(e.name, tuple(e.attributes.items())) for e in entities}) == 200
    for e in entities:
        assert e.name in lexicon().names and 3 <= len(e.attributes) <= 4


def test_gold_answer_follows_a_cue_word_in_gold_passage(world):
    for q in world.questions(kind="knowledge"):
        text = world.passage_by_id(q["gold_passage_id"])["text"]
        answer = q["answers"][0]
        match = re.search(rf"(\w+) {re.escape(answer)}\b", text)
        assert match, (q, text)
        assert match.group(1) in CUE_WORDS, (q, text)


def test_heldout_wordings_are_disjoint_from_train(world):
    for kind in ("knowledge", "no_knowledge", "long_form"):
        train = world.questions(split="train", kind=kind)
        heldout = world.questions(split="heldout", kind=kind)
        assert train and heldout
        assert not {q["template"] for q in train} & {q["template"] for q in heldout}
        assert not {q["instruction"] for q in train} & {q["instruction"] for q in heldout}


def test_long_form_questions_ask_two_facts_of_one_entity_in_both_orders(world):
    entities = {e.id: e for e in world.entities}
    questions = world.questions(kind="long_form")
    assert questions and all(q["task"] == "asqa" for q in questions)
    asked = set()
    for q in questions:
        entity = entities[q["id"].split("-")[0]]
        first, second = q["attribute"].split("+")
        assert q["answers"] == [entity.attributes[first], entity.attributes[second]]
        assert q["gold_passage_id"] == "p" + entity.id[1:] and entity.name in q["instruction"]
        nouns = [attribute_spec(entity.type, a).noun for a in (first, second)]
        assert q["instruction"].index(f"the {nouns[0]} and") < q["instruction"].index(f"the {nouns[1]}")
        asked.add((entity.id, first, second, q["split"]))
    # every pair is asked in both orders, in both splits
    assert all((e, b, a, split) in asked for e, a, b, split in asked)


def test_no_knowledge_answers(world):
    for q in world.questions(kind="no_knowledge"):
        assert q["gold_passage_id"] is None
        numbers = [int(n) for n in re.findall(r"\d+", q["instruction"])]
        if len(numbers) == 2:
            assert q["answers"] == [str(sum(numbers))]
        elif re.search(r"\b(hello|hi|greet)\b", q["instruction"].lower()):
            assert q["answers"] == ["Hello!"]
        else:
            assert q["answers"][0] in q["instruction"]


def test_questions_rejects_unknown_split(world):
    with pytest.raises(ValueError):
        world.questions(split="test")


def read_queries(data_dir: Path) -> list[dict]:
    """Read both demo shards, checking their columns."""
    rows = []
    for i in range(2):
        table = pq.read_table(data_dir / "queries" / f"part-{i:05d}.parquet")
        assert table.column_names == QUERY_COLUMNS
        rows += table.to_pylist()
    return rows


def test_demo_data_writer(tmp_path, world):
    make_demo_assets(["--out-data", str(tmp_path / "demo")])
    corpus = pq.read_table(tmp_path / "demo" / "corpus.parquet")
    assert corpus.column_names == ["id", "title", "text"]
    assert corpus.num_rows == 300
    assert str(corpus.schema.field("text").type) == "string"

    rows = read_queries(tmp_path / "demo")
    assert 36 <= len(rows) <= 44
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(r["answers"] and r["source"] == "synthetic-world" for r in rows)
    assert sum(r["task"] == "fever" for r in rows) == 2
    assert sum(r["task"] == "arc_c" for r in rows) == 2
    assert sum(r["input"] is not None for r in rows) == 1
    with_ctxs = [r for r in rows if r["ctxs"] is not None]
    assert len(with_ctxs) == 3
    for r in with_ctxs:
        assert len(r["ctxs"]) == 2
        assert any(r["answers"][0] in c["text"] for c in r["ctxs"])
    heldout = {q["id"] for q in world.questions(split="heldout")}
    plain = [r for r in rows if r["task"] is None]
    assert all(r["id"] in heldout for r in plain)
    assert {r["answers"][0] for r in rows if r["task"] == "fever"} == {"true", "false"}
    for r in rows:
        if r["task"] == "arc_c":
            lines = r["instruction"].splitlines()
            assert [line[:3] for line in lines[1:]] == ["A: ", "B: ", "C: ", "D: "]
            assert r["answers"][0] in ("A", "B", "C", "D")


def test_committed_demo_data_matches_the_generator(tmp_path):
    committed = REPO / "data" / "demo"
    make_demo_assets(["--out-data", str(tmp_path)])
    assert read_queries(tmp_path) == read_queries(committed)
    fresh = pq.read_table(tmp_path / "corpus.parquet")
    assert fresh.equals(pq.read_table(committed / "corpus.parquet"))
