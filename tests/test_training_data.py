"""The tiny model's training data: Self-RAG's format, and a loss that skips prompt and paragraph."""

from __future__ import annotations

import random
import re

import pytest

from jobs.train_tiny_model import build_tokenizer, check_tokenizer
from pipeline.selfrag.prompts import format_prompt
from pipeline.synthetic.training_data import (
    NOT_IN_LOSS, direct_example, evidence_example, label_ids, sample_example)
from pipeline.synthetic.world import lexicon


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(seed=0)


def in_loss(tok, example) -> list[str]:
    ids, labels = label_ids(tok, example)
    assert len(ids) == len(labels)
    return [tok.convert_ids_to_tokens(i) for i, y in zip(ids, labels) if y != NOT_IN_LOSS]


def test_worked_example_with_a_relevant_passage(tok):
    prompt = format_prompt("What is the capital of Thalska?")
    ex = evidence_example(prompt, "Thalska", "Thalska is a country. The capital of Thalska is Fengal.",
                          relevant=True, answer="Fengal", kind="gold")
    assert ex.text == (
        "### Instruction:\nWhat is the capital of Thalska?\n\n### Response:\n"
        "[Retrieval]<paragraph>Thalska\nThalska is a country. The capital of Thalska is Fengal.</paragraph>"
        "[Relevant]Fengal[Fully supported][Utility:5]</s>")
    # by hand: the retrieval token, then everything after </paragraph>; not the prompt, not
    # the paragraph (whose "Fengal" is the same token as the answer's)
    assert [ex.text[a:b] for a, b in ex.loss_spans] == [
        "[Retrieval]", "[Relevant]Fengal[Fully supported][Utility:5]</s>"]
    assert in_loss(tok, ex) == ["[Retrieval]", "[Relevant]", "ĠFengal", "[Fully supported]", "[Utility:5]", "</s>"]
    ids, labels = label_ids(tok, ex)
    assert ids[0] == tok.bos_token_id and labels[0] == NOT_IN_LOSS
    assert ids.count(tok.convert_tokens_to_ids("ĠFengal")) == 2  # in the paragraph and the answer
    assert tok(ex.text).input_ids == ids  # what inference sees is what training saw


def test_worked_examples_irrelevant_and_direct(tok):
    prompt = format_prompt("Say hello.")
    direct = direct_example(prompt, "Hello!", "greeting")
    assert direct.text.endswith("### Response:\n[No Retrieval]Hello![Utility:5]</s>")
    assert in_loss(tok, direct) == ["[No Retrieval]", "ĠHello", "!", "[Utility:5]", "</s>"]
    other = evidence_example(format_prompt("What is the capital of Thalska?"), "Fengal",
                             "Fengal is a river.", relevant=False, answer="I do not know.", kind="unrelated")
    assert in_loss(tok, other)[:2] == ["[Retrieval]", "[Irrelevant]"]
    assert in_loss(tok, other)[-2:] == ["[Utility:1]", "</s>"]
    assert "Ġriver" not in in_loss(tok, other)


def test_sampled_examples_are_well_formed(tok):
    rng = random.Random(0)
    kinds = set()
    for _ in range(300):
        ex = sample_example(rng)
        kinds.add(ex.kind)
        tokens = in_loss(tok, ex)
        assert tokens[0] in ("[Retrieval]", "[No Retrieval]") and tokens[-1] == "</s>"
        assert tokens[-2].startswith("[Utility:")
        if ex.kind == "gold":  # the answer restates the paragraph's fact sentence
            assert re.fullmatch(r"The [a-z ]+ of \w+ is \w+\.", ex.answer), ex.answer
            assert ex.answer in ex.text.split("<paragraph>")[1].split("</paragraph>")[0]
    assert kinds == {"gold", "unrelated", "greeting", "add", "repeat", "no_knowledge_with_passage"}


def test_every_lexicon_word_is_one_token(tok):
    check_tokenizer(tok)  # raises if not
    word = lexicon().names[0]
    assert len(tok(f"What is the capital of {word}?", add_special_tokens=False).input_ids) == 8  # Ġ What Ġis Ġthe Ġcapital Ġof ĠName ?
