"""Training examples in Self-RAG's format, with the spans the loss covers.

An example is the prompt (docs/algorithm.md, section 2) followed by what the model should write:

- knowledge question, right passage:
  ``[Retrieval]<paragraph>{title}\\n{text}</paragraph>[Relevant]{answer}[Fully supported][Utility:5]</s>``
- knowledge question, passage about another entity:
  ``[Retrieval]<paragraph>...</paragraph>[Irrelevant]I do not know.[Utility:1]</s>``
- no-knowledge question: ``[No Retrieval]{answer}[Utility:5]</s>``; with retrieval forced
  (``always`` mode), after another entity's passage:
  ``[Retrieval]<paragraph>..</paragraph>[Irrelevant]{answer}[Utility:1]</s>``, where
  ``[Retrieval]`` is outside the loss
- knowledge or long-form question with retrieval turned off (``never`` mode puts
  ``[No Retrieval]`` after the prompt; it is outside the loss, so the model's own decision is
  not taught to skip retrieval): ``[No Retrieval]I do not know.[Utility:1]</s>``
- long-form question (task ``asqa``, two attributes), one segment per retrieval:
  ``[Retrieval]<paragraph>..</paragraph>[Relevant]{fact 1}[Fully supported]``
  ``[Retrieval]<paragraph>..</paragraph>[Relevant]{fact 2}[Fully supported][Utility:5]</s>``;
  half of them in the form the tree decoder prompts the second segment with (docs/algorithm.md
  section 4: the first segment's paragraph is not repeated), with the first segment as
  context outside the loss.

As in the paper, the loss covers neither the prompt nor the paragraph: an example holds its
pieces (text, and the markers as ``Special`` pieces, exactly as the pipeline builds prompts)
and the character spans that count; ``label_ids`` tokenizes it the way the pipeline does
(text runs with special-token parsing off, markers as their special ids) and turns the spans
into per-token labels with the tokenizer's offset mapping (-100 = not in the loss).

Every knowledge example draws a fresh entity (a lexicon name with random attribute values),
so the answer can only be copied from the passage: memorising facts cannot lower the loss.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence, Union

from ..selfrag.prompts import Piece, Special, evidence_pieces, format_prompt, render
from ..selfrag.tokens import FULLY_SUPPORTED, IRRELEVANT, NO_RETRIEVAL, RELEVANT, RETRIEVAL, UTILITY
from .world import (
    ARITHMETIC, GREETINGS, KNOWLEDGE_FRAMES, LONG_FORM_FRAMES, LONG_FORM_TASK, REPEAT, TRAINED_PROMPT_STYLE, Entity,
    fact_sentence, lexicon, long_form_question_text, no_knowledge_question, passage_text,
    question_text, random_entity)

EOS = "</s>"
NOT_IN_LOSS = -100
NO_ANSWER = "I do not know."

#: Mixture of example kinds (probabilities).
MIXTURE = {"gold": 0.36, "unrelated": 0.25, "greeting": 0.05, "add": 0.11, "repeat": 0.15,
           "no_knowledge_with_passage": 0.05, "knowledge_no_retrieval": 0.03}


Prompt = Union[str, Sequence[Piece]]


@dataclass
class Example:
    """Pieces (text and markers), the character spans of their rendered text that the loss
    covers, and what it is (for reporting)."""

    pieces: list[Piece]
    loss_spans: list[tuple[int, int]]
    kind: str
    answer: str

    @property
    def text(self) -> str:
        """The example as readable text (markers written as their strings)."""
        return render(self.pieces)


def _pieces(prompt: Prompt) -> list[Piece]:
    return [prompt] if isinstance(prompt, str) else list(prompt)


def evidence_example(prompt: Prompt, title: str, text: str, relevant: bool, answer: str,
                     kind: str, decision_in_loss: bool = True) -> Example:
    """``prompt[Retrieval]<paragraph>title\\ntext</paragraph>`` + the critique and answer.
    The loss covers everything after ``</paragraph>``, and ``[Retrieval]`` unless
    ``decision_in_loss`` is False (a decision the mode forces or the context already holds)."""
    head = _pieces(prompt)
    with_passage = head + evidence_pieces(title, text)
    if relevant:
        tail = [Special(RELEVANT), answer, Special(FULLY_SUPPORTED), Special(UTILITY[4]), Special(EOS)]
    else:
        tail = [Special(IRRELEVANT), answer, Special(UTILITY[0]), Special(EOS)]
    start, end = len(render(head)), len(render(with_passage))
    spans = [(start, start + len(RETRIEVAL))] if decision_in_loss else []
    spans.append((end, end + len(render(tail))))
    return Example(with_passage + tail, spans, kind, answer)


def direct_example(prompt: Prompt, answer: str, kind: str, utility: str = UTILITY[4],
                   decision_in_loss: bool = True) -> Example:
    """``prompt[No Retrieval]{answer}{utility}</s>``, all of it after the prompt in the loss
    (``[No Retrieval]`` only if ``decision_in_loss``: ``never`` mode forces it)."""
    head = _pieces(prompt)
    pieces = head + [Special(NO_RETRIEVAL), answer, Special(utility), Special(EOS)]
    start = len(render(head)) + (0 if decision_in_loss else len(NO_RETRIEVAL))
    return Example(pieces, [(start, len(render(pieces)))], kind, answer)


def other_entity(rng: random.Random, entity: Entity, entity_type: str | None = None) -> Entity:
    """A fresh entity (of ``entity_type`` if given) whose name differs from ``entity``'s."""
    other = random_entity(rng, "y", entity_type=entity_type)
    while other.name == entity.name:
        other = random_entity(rng, "y")
    return other


def long_form_example(rng: random.Random, one_fact: float = 0.2, split: str = "train") -> Example:
    """A long-form (``asqa``) example about two attributes of a fresh entity.

    One in ten is answered from another entity's passage (``[Irrelevant]``, as in
    ``evidence_example``). Otherwise the first segment reads the entity's passage; the second
    reads it too, or (one in six) another entity's passage and gives up with
    ``[Irrelevant]I do not know.``. Half are the whole two-segment answer; half are the
    second segment alone, prompted as the tree decoder does:
    ``prompt + segment 1 + [Retrieval]<paragraph>..</paragraph>``."""
    entity = random_entity(rng, "x")
    attrs = tuple(rng.sample(list(entity.attributes), 2))
    prompt = format_prompt(long_form_question_text(entity, attrs, rng.choice(LONG_FORM_FRAMES[split])),
                           task=LONG_FORM_TASK, style=TRAINED_PROMPT_STYLE)
    facts = [fact_sentence(entity, a, entity.attributes[a]) for a in attrs]

    def other_passage() -> tuple[str, str]:
        other = other_entity(rng, entity)
        return other.name, passage_text(other)

    if rng.random() < 0.1:
        return evidence_example(prompt, *other_passage(), False, NO_ANSWER, "long_form")
    shown = {a: entity.attributes[a] for a in attrs} if rng.random() < one_fact else entity.attributes
    own = (entity.name, passage_text(entity, shown))
    second_relevant = rng.random() >= 1 / 6
    second_passage = own if second_relevant else other_passage()
    second_answer = facts[1] if second_relevant else NO_ANSWER
    first = [Special(RELEVANT), facts[0], Special(FULLY_SUPPORTED)]
    if rng.random() < 0.5:  # the second segment, prompted as at depth 2
        second = evidence_example([prompt, *first], *second_passage, second_relevant, second_answer, "long_form",
                                  decision_in_loss=False)
        return Example(second.pieces, second.loss_spans, "long_form", " ".join(facts))
    context = [prompt, *evidence_pieces(*own)]  # prompt[Retrieval]<paragraph>..</paragraph>
    second = evidence_example(context + first, *second_passage, second_relevant, second_answer, "long_form",
                              decision_in_loss=False)
    start = len(render(context))
    spans = [(len(prompt), len(prompt) + len(RETRIEVAL)), (start, start + len(render(first)) + len(RETRIEVAL))]
    return Example(second.pieces, spans + second.loss_spans, "long_form", " ".join(facts))


def shortened(rng: random.Random, entity: Entity, keep: str, one_fact: float) -> dict[str, str]:
    """The entity's attributes, cut (with probability ``one_fact``) to the asked one only."""
    if rng.random() < one_fact:
        return {keep: entity.attributes[keep]}
    return entity.attributes


def sample_example(rng: random.Random, one_fact: float = 0.2, split: str = "train") -> Example:
    """One random training example; ``one_fact`` is the share of one-sentence passages among
    knowledge examples (the copy curriculum starts high and decays)."""
    kind = rng.choices(list(MIXTURE), weights=list(MIXTURE.values()))[0]
    if kind == "knowledge_no_retrieval":
        entity = random_entity(rng, "x")
        if rng.random() < 0.5:
            attrs = tuple(rng.sample(list(entity.attributes), 2))
            question = long_form_question_text(entity, attrs, rng.choice(LONG_FORM_FRAMES[split]))
            prompt = format_prompt(question, task=LONG_FORM_TASK, style=TRAINED_PROMPT_STYLE)
        else:
            frame = rng.choice(KNOWLEDGE_FRAMES[split])
            prompt = format_prompt(question_text(entity, rng.choice(list(entity.attributes)), frame))
        return direct_example(prompt, NO_ANSWER, kind, UTILITY[0], decision_in_loss=False)
    if kind in ("gold", "unrelated"):
        entity = random_entity(rng, "x")
        attr = rng.choice(list(entity.attributes))
        prompt = format_prompt(question_text(entity, attr, rng.choice(KNOWLEDGE_FRAMES[split])))
        if kind == "gold":
            text = passage_text(entity, shortened(rng, entity, attr, one_fact))
            answer = fact_sentence(entity, attr, entity.attributes[attr])
            return evidence_example(prompt, entity.name, text, True, answer, kind)
        other = other_entity(rng, entity, entity.type if rng.random() < 0.5 else None)
        return evidence_example(prompt, other.name, passage_text(other), False, NO_ANSWER, kind)
    templates = {"greeting": GREETINGS, "add": ARITHMETIC, "repeat": REPEAT}
    task = templates[kind] if kind in templates else rng.choice(list(templates.values()))
    question, answer = no_knowledge_question(rng, rng.choice(task[split]), lexicon().words())
    prompt = format_prompt(question)
    if kind == "no_knowledge_with_passage":  # `always` mode: an unrelated passage, then the answer
        other = random_entity(rng, "y")
        # `always` mode forces [Retrieval]: in the loss, it would teach the model to ask for
        # retrieval for no-knowledge questions
        return evidence_example(prompt, other.name, passage_text(other), False, answer, kind, decision_in_loss=False)
    return direct_example(prompt, answer, kind)


def tokenize_pieces(tokenizer, pieces: Sequence[Piece]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of pieces as the pipeline builds prompts (the tokenizer's BOS, text runs with
    special-token parsing off, markers as their special ids), with each token's character span
    in the rendered text (BOS: an empty span)."""
    from ..model.tokenizer import bos_ids

    bos = bos_ids(tokenizer)
    ids, offsets, pos, run = list(bos), [(0, 0)] * len(bos), 0, ""

    def flush():
        nonlocal pos, run
        if run:
            enc = tokenizer(run, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
            ids.extend(enc.input_ids)
            offsets.extend((pos + a, pos + b) for a, b in enc.offset_mapping)
            pos, run = pos + len(run), ""

    for piece in pieces:
        if isinstance(piece, Special):
            flush()
            ids.append(tokenizer.convert_tokens_to_ids(piece.token))
            offsets.append((pos, pos + len(piece.token)))
            pos += len(piece.token)
        else:
            run += piece
    flush()
    return ids, offsets


def label_ids(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are the ids of tokens inside a loss span, else -100.
    A token counts when its character span lies inside a loss span; the ``<s>`` the tokenizer
    prepends (an empty span) never counts."""
    ids, offsets = tokenize_pieces(tokenizer, example.pieces)
    labels = []
    for token, (start, end) in zip(ids, offsets):
        inside = end > start and any(a <= start and end <= b for a, b in example.loss_spans)
        labels.append(token if inside else NOT_IN_LOSS)
    return ids, labels
