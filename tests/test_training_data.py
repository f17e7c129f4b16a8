"""The tiny model's training data: Self-RAG's format, and a loss that skips prompt and paragraph."""

from __future__ import annotations

import random
import re

import pytest

from jobs.train_tiny_model import build_tokenizer, check_tokenizer
from pipeline.selfrag.prompts import TASK_INSTRUCTIONS, evidence_prompt, format_prompt
from pipeline.synthetic.training_data import (
    NOT_IN_LOSS, direct_example, evidence_example, label_ids, long_form_example, sample_example)
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
        if ex.kind == "knowledge_no_retrieval":  # `never` mode: the decision is given, not learned
            assert ex.text.endswith("[No Retrieval]I do not know.[Utility:1]</s>")
            assert tokens[0] != "[No Retrieval]" and "[Retrieval]" not in tokens
        elif ex.kind == "no_knowledge_with_passage":  # `always` mode: likewise
            assert "[Retrieval]<paragraph>" in ex.text and tokens[0] == "[Irrelevant]"
        else:
            assert tokens[0] in ("[Retrieval]", "[No Retrieval]")
        assert tokens[-1] == "</s>"
        assert tokens[-2].startswith("[Utility:")
        if ex.kind == "gold":  # the answer restates the paragraph's fact sentence
            assert re.fullmatch(r"The [a-z ]+ of \w+ is \w+\.", ex.answer), ex.answer
            assert ex.answer in ex.text.split("<paragraph>")[1].split("</paragraph>")[0]
    assert kinds == {"gold", "unrelated", "greeting", "add", "repeat", "no_knowledge_with_passage",
                     "knowledge_no_retrieval"}


def test_the_retrieval_decision_is_taught_only_one_way_per_kind(tok):
    """Where a decision token is in the loss, knowledge kinds learn [Retrieval] and no-knowledge
    kinds [No Retrieval]; examples whose decision the mode forces (always, never) teach none.
    (A forced [Retrieval] left in the loss once taught P[Retrieval] = 0.23 for repeat-a-word.)"""
    rng = random.Random(3)
    taught: dict[str, set] = {}
    for _ in range(1500):
        ex = sample_example(rng)
        decisions = {t for t in in_loss(tok, ex) if t in ("[Retrieval]", "[No Retrieval]")}
        taught.setdefault(ex.kind, set()).update(decisions)
    assert taught == {"gold": {"[Retrieval]"}, "unrelated": {"[Retrieval]"}, "greeting": {"[No Retrieval]"},
                      "add": {"[No Retrieval]"}, "repeat": {"[No Retrieval]"}, "no_knowledge_with_passage": set(),
                      "knowledge_no_retrieval": set()}


def test_every_lexicon_word_is_one_token(tok):
    check_tokenizer(tok)  # raises if not
    word = lexicon().names[0]
    assert len(tok(f"What is the capital of {word}?", add_special_tokens=False).input_ids) == 8  # Ġ What Ġis Ġthe Ġcapital Ġof ĠName ?


def test_long_form_examples_have_two_segments_and_the_decoders_depth_two_prompt(tok):
    """Three shapes (see long_form_example): the whole two-segment answer, the second segment
    alone after segment 1 (no paragraph before it, as the tree decoder prompts depth 2), and a
    single [Irrelevant] segment. The loss never covers the prompt, a paragraph or, in the
    depth-2 shape, segment 1."""
    asqa = TASK_INSTRUCTIONS["asqa"]
    rng = random.Random(0)
    seg1 = r"\[Relevant\]The ([a-z ]+) of (\w+) is (\w+)\.\[Fully supported\]"
    seg2 = r"(\[Relevant\]The ([a-z ]+) of (\w+) is (\w+)\.\[Fully supported\]\[Utility:5\]|\[Irrelevant\]I do not know\.\[Utility:1\])</s>"
    shapes = set()
    for _ in range(200):
        ex = long_form_example(rng)
        assert ex.kind == "long_form" and asqa in ex.text
        question = ex.text.split(asqa + "\n\n")[1].split("\n\n### Response:")[0]
        nouns = re.search(r"the ([a-z ]+?) and the ([a-z ]+?)( of |\.|\?)", question).groups()[:2]
        response = ex.text.split("### Response:\n")[1]
        spans = [ex.text[a:b] for a, b in ex.loss_spans]
        assert all(a >= ex.text.index("### Response:\n") for a, _ in ex.loss_spans)
        for a, b in ex.loss_spans:  # no span reaches into a paragraph
            assert "<paragraph>" not in ex.text[a:b] and "</paragraph>" not in ex.text[a:b]
        if len(spans) == 3:  # whole answer: decision, segment 1 + retrieval point, segment 2
            shapes.add("whole")
            assert spans[0] == "[Retrieval]" and re.fullmatch(seg1 + r"\[Retrieval\]", spans[1])
            assert re.fullmatch(seg2, spans[2])
            assert re.match(seg1, spans[1]).group(1) == nouns[0]  # question order, not passage order
            if spans[2].startswith("[Relevant]"):
                assert re.match(seg2, spans[2]).group(2) == nouns[1]
            assert in_loss(tok, ex).count("[Retrieval]") == 2
        elif response.startswith("[Relevant]"):  # depth-2 prompt: segment 1 is context
            shapes.add("depth 2")
            assert len(spans) == 1 and re.fullmatch(seg2, spans[0])
            assert re.match(seg1, response).group(1) == nouns[0]
            if spans[0].startswith("[Relevant]"):
                assert re.match(seg2, spans[0]).group(2) == nouns[1]
            assert in_loss(tok, ex)[0] in ("[Relevant]", "[Irrelevant]")
        else:  # another entity's passage from the start
            shapes.add("irrelevant")
            assert spans == ["[Retrieval]", "[Irrelevant]I do not know.[Utility:1]</s>"]
    assert shapes == {"whole", "depth 2", "irrelevant"}


def test_depth_two_prompt_of_the_decoder_tokenizes_as_training_wrote_it(tok):
    """The tree decoder builds depth 2 from segment 1 *decoded* from token ids (the decoded
    text may differ in spaces, e.g. "[Relevant] The"); its token ids must be those of the
    depth-2 training text."""
    rng = random.Random(1)
    ex = next(e for e in (long_form_example(rng) for _ in range(100)) if len(e.loss_spans) == 3)
    ids = tok(ex.text).input_ids
    close, retrieval = (tok.convert_tokens_to_ids(t) for t in ("</paragraph>", "[Retrieval]"))
    start = ids.index(close) + 1
    raw = tok.decode(ids[start:ids.index(retrieval, start)], skip_special_tokens=False)
    prompt = ex.text[: ex.text.index("[Retrieval]")]
    first = ex.text.split("</paragraph>")[1].split("[Retrieval]")[0]
    title, text = ex.text.split("<paragraph>")[2].split("</paragraph>")[0].split("\n", 1)
    decoder = evidence_prompt(prompt + raw, title, text)
    training = evidence_prompt(prompt + first, title, text)
    assert first.startswith("[Relevant]The ") and first.endswith("[Fully supported]")
    assert tok(decoder).input_ids == tok(training).input_ids
