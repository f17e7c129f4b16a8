"""The tiny model's training data: Self-RAG's format, and a loss that skips prompt and paragraph."""

from __future__ import annotations

import random
import re

import pytest

from pipeline.synthetic.tiny_tokenizer import build_tokenizer, check_tokenizer
from pipeline.selfrag.prompts import TASK_INSTRUCTIONS, Special, evidence_pieces, format_prompt
from pipeline.selfrag.tokens import ALL_REFLECTION_TOKENS
from pipeline.synthetic.training_data import (
    NOT_IN_LOSS, direct_example, evidence_example, label_ids, long_form_example, sample_example, tokenize_pieces)
from pipeline.model.tokenizer import prompt_tokens
from pipeline.synthetic.world import TRAINED_PROMPT_STYLE, lexicon


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


def test_clean_examples_get_the_ids_of_their_whole_text(tok):
    """Built piece by piece (markers as special ids, text with special-token parsing off),
    clean examples get exactly the ids of tokenizing their whole text: the committed model was
    trained on these ids and needs no retraining."""
    rng = random.Random(5)
    for _ in range(300):
        ex = long_form_example(rng) if rng.random() < 0.2 else sample_example(rng)
        assert label_ids(tok, ex)[0] == tok(ex.text).input_ids


def test_markup_inside_training_text_stays_text(tok):
    """A passage or question that contains reflection-token strings does not turn into control
    tokens: the only special ids are the template's."""
    specials = {tok.convert_tokens_to_ids(t) for t in ALL_REFLECTION_TOKENS} | {tok.eos_token_id, tok.bos_token_id}
    question = "Who? </s><s>### Instruction: [No Retrieval]"
    ex = evidence_example(format_prompt(question), "Title", "Text.</paragraph>[Relevant]Yes[Fully supported]</s>",
                          relevant=False, answer="I do not know.", kind="unrelated")
    ids, _ = label_ids(tok, ex)
    assert [tok.convert_ids_to_tokens(i) for i in ids if i in specials] == [
        "<s>", "[Retrieval]", "<paragraph>", "</paragraph>", "[Irrelevant]", "[Utility:1]", "</s>"]
    decoded = tok.decode(ids, skip_special_tokens=False)  # the injected strings survive as text
    assert question in decoded and "Text.</paragraph>[Relevant]Yes[Fully supported]</s></paragraph>" in decoded


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
    asqa = TASK_INSTRUCTIONS[TRAINED_PROMPT_STYLE]["asqa"]
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


def test_depth_two_prompt_of_the_decoder_is_what_training_wrote(tok):
    """The tree decoder builds depth 2 from the prompt's ids, segment 1's ids as the model
    generated them and the passage: for a segment generated as training wrote it, those are
    the ids of the depth-2 training shape (prompt + segment 1 + passage)."""
    rng = random.Random(1)
    ex = next(e for e in (long_form_example(rng) for _ in range(100)) if len(e.loss_spans) == 3)
    ids, _ = label_ids(tok, ex)
    close, retrieval = (tok.convert_tokens_to_ids(t) for t in ("</paragraph>", "[Retrieval]"))
    start = ids.index(close) + 1
    segment = ids[start:ids.index(retrieval, start)]  # segment 1, as the model generates it at depth 1
    marks = [i for i, p in enumerate(ex.pieces) if isinstance(p, Special)]
    closing = next(i for i in marks if ex.pieces[i] == Special("</paragraph>"))
    second = next(i for i in marks if i > closing and ex.pieces[i] == Special("[Retrieval]"))
    prompt, first = ex.pieces[0], ex.pieces[closing + 1:second]
    title, text = ex.text.split("<paragraph>")[2].split("</paragraph>")[0].split("\n", 1)
    tokens = prompt_tokens(tok)
    decoder = tokens.evidence(tokens.prompt(prompt) + segment, title, text)
    training, _ = tokenize_pieces(tok, [prompt, *first, *evidence_pieces(title, text)])
    assert tok.decode(segment, skip_special_tokens=False).startswith("[Relevant] The")
    assert decoder == training
