"""Tests for the synthetic world and the demo-asset writer (jobs/make_demo_assets.py)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import make_demo_assets
from pipeline.synthetic.world import build_world

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


def test_gold_answer_follows_a_cue_word_in_gold_passage(world):
    for q in world.questions(kind="knowledge"):
        text = world.passage_by_id(q["gold_passage_id"])["text"]
        answer = q["answers"][0]
        match = re.search(rf"(\w+) {re.escape(answer)}\b", text)
        assert match, (q, text)
        assert match.group(1) in CUE_WORDS, (q, text)


def test_heldout_wordings_are_disjoint_from_train(world):
    for kind in ("knowledge", "no_knowledge"):
        train = world.questions(split="train", kind=kind)
        heldout = world.questions(split="heldout", kind=kind)
        assert train and heldout
        assert not {q["template"] for q in train} & {q["template"] for q in heldout}
        assert not {q["instruction"] for q in train} & {q["instruction"] for q in heldout}


def test_no_knowledge_answers(world):
    for q in world.questions(kind="no_knowledge"):
        assert q["gold_passage_id"] is None
        numbers = [int(n) for n in re.findall(r"\d+", q["instruction"])]
        if len(numbers) == 2:
            assert q["answers"] == [str(sum(numbers))]
        elif "hello" in q["instruction"].lower() or "greet" in q["instruction"].lower():
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
    make_demo_assets.main(["--out-data", str(tmp_path / "demo"), "--skip-model"])
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
    make_demo_assets.main(["--out-data", str(tmp_path), "--skip-model"])
    assert read_queries(tmp_path) == read_queries(committed)
    fresh = pq.read_table(tmp_path / "corpus.parquet")
    assert fresh.equals(pq.read_table(committed / "corpus.parquet"))


def test_tiny_model_assets(tmp_path):
    import transformers

    out = tmp_path / "model"
    make_demo_assets.main(["--out-data", str(tmp_path / "demo"), "--out-model", str(out)])
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in out.iterdir()) < 5_000_000

    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = [tok.convert_tokens_to_ids(t) for t in make_demo_assets.REFLECTION_TOKENS]
    assert len(set(ids)) == 15 and tok.unk_token_id not in ids
    enc = tok("### Response:\n[Retrieval]<paragraph>X\nY</paragraph>").input_ids
    assert enc[0] == tok.bos_token_id
    assert tok.convert_tokens_to_ids("[Retrieval]") in enc
    text = "".join(make_demo_assets.REFLECTION_TOKENS)
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text

    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] >= len(tok) and config["vocab_size"] % 8 == 0
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
