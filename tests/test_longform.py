"""Unit tests of long-form tree decoding (docs/algorithm.md, section 4) on scripted continuations.

Every tree, score, beam choice and citation below is worked out by hand in the comments.
Weights are the paper's (w_rel 1, w_sup 1, w_use 0.5, no seq score) unless a test says so.
"""

import math

import pytest

from pipeline.selfrag import tokens as T
from pipeline.selfrag.longform import (
    LongFormParams,
    LongFormTree,
    cite,
    redecide_probability,
    retrieval_point,
)
from pipeline.selfrag.prompts import PromptTokens
from pipeline.selfrag.scoring import Continuation, ScoreWeights

# Reflection tokens get ids 100..114; ordinary "words" are whole sentences with small ids.
IDS = T.ReflectionIds.from_lookup({tok: 100 + i for i, tok in enumerate(T.ALL_REFLECTION_TOKENS)}.get)
R, N, C = IDS[T.RETRIEVAL], IDS[T.NO_RETRIEVAL], IDS[T.CONTINUE_EVIDENCE]
REL, IRR = IDS[T.RELEVANT], IDS[T.IRRELEVANT]
FULL, PART, NOSUP = IDS[T.FULLY_SUPPORTED], IDS[T.PARTIALLY_SUPPORTED], IDS[T.NO_SUPPORT]
U = [IDS[t] for t in T.UTILITY]
EOS = 2
WORDS = {
    EOS: "</s>",
    10: " Ada wrote notes.",
    11: " She died in 1852.",
    12: " She was a countess.",
    13: " Babbage built engines.",
    14: " He lived in London.",
    15: " He designed a computer.",
    16: " He was a mathematician.",
}
VOCAB = {**WORDS, **{IDS[t]: t for t in T.ALL_REFLECTION_TOKENS}}

QUESTION = "Who were Ada and Babbage?"
PROMPT = f"### Instruction:\n{QUESTION}\n\n### Response:\n"
P = {i: {"id": f"p{i}", "title": f"T{i}", "text": f"text {i}"} for i in range(1, 10)}
ln = math.log


def decode(token_ids):
    """The fake tokenizer's decode, reflection tokens kept."""
    return "".join(VOCAB[t] for t in token_ids)


def at(token, probs):
    """A sampled token with the reflection-token probabilities returned at its position."""
    return token, {tid: ln(p) for tid, p in probs.items() if p > 0}


def rel(p):
    """[Relevant] sampled at position 0 with s_rel = p."""
    return at(REL, {REL: p, IRR: 1 - p})


def sup(token, full=0.0, part=0.0, nosup=0.0):
    """An ISSUP token sampled; s_sup = (full + part/2) / (full + part + nosup)."""
    return at(token, {FULL: full, PART: part, NOSUP: nosup})


def use(k, probs):
    """[Utility:k] sampled with the five utility probabilities."""
    return at(U[k - 1], dict(zip(U, probs)))


def gen(*positions, cum=0.0):
    """A continuation from positions that are token ids or (token id, {id: logprob})."""
    ids, logprobs = [], []
    for pos in positions:
        tid, lp = (pos, {}) if isinstance(pos, int) else pos
        ids.append(tid)
        logprobs.append(lp)
    return Continuation(token_ids=ids, logprobs=logprobs, cumulative_logprob=cum)


BOS = 1
# A fake tokenizer for prompt text: one id per character (1000 + its code point).
TOKENS = PromptTokens(lambda text: [1000 + ord(c) for c in text], IDS, bos=[BOS])


def text_ids(text):
    return [1000 + ord(c) for c in text]


def evidence_ids(passage):
    return [R, IDS[T.PARAGRAPH_OPEN], *text_ids(f"{passage['title']}\n{passage['text']}"), IDS[T.PARAGRAPH_CLOSE]]


def tree(retrieve=True, **params):
    return LongFormTree(PROMPT, TOKENS.prompt(PROMPT), QUESTION, IDS, LongFormParams(**params), TOKENS, decode,
                        retrieve=retrieve)


def step(t, passages, outputs):
    """Run one depth: passages aligned with pending_queries(), outputs with requests()."""
    pending = t.pending_queries()
    reqs = t.requests({key: ps for (key, _), ps in zip(pending, passages)})
    t.advance(outputs)
    return pending, reqs


def queries(pending):
    return [q for _, q in pending]


# --- helpers --------------------------------------------------------------------------------

def test_redecide_probability_and_retrieval_points():
    # (0.1 + 0.1) / (0.1 + 0.6) = 0.2857 ; (0.05 + 0.05) / (0.05 + 0.8) = 0.1176
    assert redecide_probability({R: ln(0.1), N: ln(0.6), C: ln(0.1)}, IDS) == pytest.approx(2 / 7)
    assert redecide_probability({R: ln(0.05), N: ln(0.8), C: ln(0.05)}, IDS) == pytest.approx(0.1 / 0.85)
    assert redecide_probability({C: ln(0.5)}, IDS) == 0.0  # denominator 0
    # a sampled [Retrieval] is a retrieval point whatever the probabilities
    assert retrieval_point(gen(REL, 10, R, 11), IDS, 0.99) == 2
    assert retrieval_point(gen(REL, 10, EOS), IDS, 0.2) is None


def test_cite_goes_before_final_punctuation():
    assert cite("Ada wrote notes.", 2) == "Ada wrote notes [2]."
    assert cite("Ada wrote notes", 1) == "Ada wrote notes [1]"


def test_params_are_checked():
    with pytest.raises(ValueError, match="max_depth"):
        LongFormParams(max_depth=1)
    with pytest.raises(ValueError, match="beam_width"):
        LongFormParams(beam_width=0)
    assert LongFormParams().weights == ScoreWeights(1.0, 1.0, 0.5, False)


# --- root -----------------------------------------------------------------------------------

def test_no_retrieval_root_is_one_uncut_generation():
    t = tree(retrieve=False)
    assert t.pending_queries() == []
    reqs = t.requests()
    assert [(r.prompt, r.passage) for r in reqs] == [(PROMPT + "[No Retrieval]", None)]
    assert reqs[0].prompt_ids == [BOS, *text_ids(PROMPT), N]
    # a [Retrieval] inside the answer does not cut it: the whole generation is the answer
    t.advance([gen(10, R, 11, use(5, (0, 0, 0, 0, 1.0)), EOS)])
    assert t.done
    res = t.result()
    assert res.text == "Ada wrote notes. She died in 1852."
    assert (res.docs, res.citations, res.depth, res.retrieved) == ([], [None], 1, False)
    assert res.raw == " Ada wrote notes.[Retrieval] She died in 1852.[Utility:5]</s>"
    assert t.stats()["requests_per_depth"] == [1] and t.stats()["queries"] == 0


def test_open_paths_at_the_last_depth_are_finished():
    # max_depth 2 = the reference's T: segments only at depth 1
    t = tree(max_depth=2, beam_width=1, top_k=1)
    step(t, [[P[1]]], [gen(rel(0.9), 10, R, 11)])
    assert t.done and t.pending_queries() == [] and t.requests() == []
    assert t.result().text == "Ada wrote notes [1]."
    with pytest.raises(RuntimeError):
        t.advance([])


def test_advance_needs_one_result_per_request():
    t = tree(top_k=2)
    t.requests({"root": [P[1], P[2]]})
    with pytest.raises(ValueError, match="expected 2 results"):
        t.advance([gen(rel(0.5), 10, EOS)])
    with pytest.raises(RuntimeError):
        t.result()


# --- (1) a shallow leaf beats deeper paths ----------------------------------------------------

def test_leaf_at_depth_one_beats_deeper_paths():
    t = tree(beam_width=2, max_depth=4, top_k=2)
    # depth 1, passages p1, p2:
    #   a: s_rel 0.9, s_sup 1.0, s_use 1.0 -> 0.9 + 1 + 0.5 = 2.4, leaf
    #   b: s_rel 0.8, s_sup (0.2 + 0.3) / 1 = 0.5 -> 1.3, asks for retrieval
    a = gen(rel(0.9), 10, sup(FULL, full=1.0), use(5, (0, 0, 0, 0, 1.0)), EOS)
    b = gen(rel(0.8), 13, sup(PART, full=0.2, part=0.6, nosup=0.2), R)
    pending, _ = step(t, [[P[1], P[2]]], [a, b])
    assert queries(pending) == [QUESTION]
    # depth 2 under b, passages p3, p4:
    #   c: 0.5 + 1 + 0.5 * 0.5 = 1.75 -> path 1.3 * 1.75 = 2.275 (best of the deepest level)
    #   d: [Irrelevant] with P(Relevant) 0.1 -> 0.1 -> path 0.13
    c = gen(rel(0.5), 14, sup(FULL, full=1.0), use(4, (0, 0, 0, 1.0, 0)), EOS)
    d = gen(at(IRR, {REL: 0.1, IRR: 0.9}), 15, EOS)
    pending, _ = step(t, [[P[3], P[4]]], [c, d])
    assert queries(pending) == [QUESTION + " Babbage built engines."]
    assert t.done and t.stats()["requests_per_depth"] == [2, 2]
    res = t.result()
    # the depth-1 leaf (2.4) beats c's path (2.275), which the reference would have returned
    assert res.score == pytest.approx(2.4) and res.depth == 1
    assert res.text == "Ada wrote notes [1]." and res.docs == [P[1]]
    assert res.segments[0]["s_use"] == pytest.approx(1.0) and res.stop_reason is None


# --- (2) dropped duplicate and empty segments; citations stay aligned -------------------------

def test_dropped_segments_keep_citations_aligned_with_docs():
    t = tree(beam_width=1, max_depth=6, top_k=1)
    outputs = [
        (P[1], gen(rel(0.9), 10, sup(FULL, full=1.0), R)),  # "Ada wrote notes."
        (P[2], gen(rel(0.9), 10, sup(PART, part=1.0), R)),  # the same text again: dropped
        (P[4], gen(R)),  # asks for retrieval at once: empty segment, dropped
        (P[3], gen(rel(0.9), 11, sup(FULL, full=1.0), R)),  # "She died in 1852."
        (P[1], gen(rel(0.9), 12, sup(FULL, full=1.0), EOS)),  # cites p1 again
    ]
    for passage, out in outputs:
        step(t, [[passage]], [out])
    assert t.done
    res = t.result()
    # kept: p1 -> [1], p3 -> [2], p1 again -> [1]; p2 and p4 are never numbered
    assert res.text == "Ada wrote notes [1]. She died in 1852 [2]. She was a countess [1]."
    assert res.citations == [1, 2, 1] and res.docs == [P[1], P[3]]
    for seg in res.segments:
        assert res.docs[seg["citation"] - 1]["id"] == seg["passage_id"]
    assert [s["depth"] for s in res.segments] == [1, 4, 5] and res.depth == 5
    assert "[Partially supported]" in res.raw  # the raw path keeps the dropped segment


# --- (3) [No Retrieval] re-decided with [Continue to Use Evidence] ---------------------------

REDECIDED = gen(rel(0.9), 10, sup(FULL, full=1.0), at(N, {R: 0.1, N: 0.6, C: 0.1}), 11, EOS)  # 2/7 > 0.2
KEPT = gen(rel(0.5), 13, sup(FULL, full=1.0), at(N, {R: 0.05, N: 0.8, C: 0.05}), 14, EOS)  # 0.118 < 0.2


def test_no_retrieval_becomes_a_retrieval_point_above_threshold():
    assert retrieval_point(REDECIDED, IDS, 0.2) == 3 and retrieval_point(KEPT, IDS, 0.2) is None
    t = tree(beam_width=2, max_depth=3, top_k=2)
    # depth 1: REDECIDED is cut before its [No Retrieval]: 0.9 + 1 = 1.9, open;
    #          KEPT stays whole: 0.5 + 1 = 1.5, a leaf
    step(t, [[P[1], P[2]]], [REDECIDED, KEPT])
    pending = t.pending_queries()
    assert queries(pending) == [QUESTION + " Ada wrote notes."]
    reqs = t.requests({pending[0][0]: [P[3]]})
    assert [r.prompt for r in reqs] == [
        PROMPT + "[Relevant] Ada wrote notes.[Fully supported][Retrieval]<paragraph>T3\ntext 3</paragraph>"]
    # as ids: the prompt, then segment 1 exactly as generated (not re-tokenized), then the passage
    assert reqs[0].prompt_ids == [BOS, *text_ids(PROMPT), REL, 10, FULL, *evidence_ids(P[3])]
    # depth 2: 0.5 + 1 = 1.5 -> path 1.9 * 1.5 = 2.85 beats KEPT's 1.5
    t.advance([gen(rel(0.5), 11, sup(FULL, full=1.0), EOS)])
    res = t.result()
    assert res.text == "Ada wrote notes [1]. She died in 1852 [2]." and res.score == pytest.approx(2.85)


def test_no_retrieval_stays_below_threshold():
    # threshold 0.3 > 2/7: REDECIDED is a leaf of two sentences, 1.9 > KEPT's 1.5
    t = tree(beam_width=2, max_depth=3, top_k=2, threshold=0.3)
    step(t, [[P[1], P[2]]], [REDECIDED, KEPT])
    assert t.done and t.stats()["depths"] == 1
    res = t.result()
    assert res.text == "Ada wrote notes. She died in 1852 [1]." and res.score == pytest.approx(1.9)


# --- (4) utility from the utility tokens, inside the segment only ----------------------------

def test_utility_is_scored_from_utility_tokens_within_the_segment():
    t = tree(beam_width=1, max_depth=3, top_k=1)
    # depth 1: the [Utility:5] after [Retrieval] belongs to regenerated text: s_use 0,
    #          step 0.5 + 1 = 1.5
    step(t, [[P[1]]], [gen(rel(0.5), 10, sup(FULL, full=1.0), R, 11, use(5, (0, 0, 0, 0, 1.0)))])
    # depth 2: s_use = 0.5 * 0.6 + 1 * 0.2 = 0.5 (probs 0, 0, 0.2, 0.6, 0.2);
    #          step 0.5 + 1 + 0.5 * 0.5 = 1.75 -> path 2.625
    step(t, [[P[2]]], [gen(rel(0.5), 11, sup(FULL, full=1.0), use(4, (0, 0, 0.2, 0.6, 0.2)), EOS)])
    res = t.result()
    assert [s["s_use"] for s in res.segments] == pytest.approx([0.0, 0.5])
    assert [s["score"] for s in res.segments] == pytest.approx([1.5, 1.75])
    assert res.score == pytest.approx(2.625)


def test_seq_score_is_honoured_when_asked():
    # seq = -2 / 4 tokens = -0.5 over the whole continuation; step = e^-0.5 + 0.5 + 1
    t = tree(beam_width=1, max_depth=2, top_k=1, weights=ScoreWeights(use_seqscore=True))
    step(t, [[P[1]]], [gen(rel(0.5), 10, sup(FULL, full=1.0), R, cum=-2.0)])
    assert t.result().score == pytest.approx(math.exp(-0.5) + 1.5)


# --- (5) the beam keeps the top B across parents ----------------------------------------------

def test_beam_keeps_top_children_across_parents():
    t = tree(beam_width=2, max_depth=4, top_k=3)
    # depth 1: c1 0.5 + 1 = 1.5, c2 0.2 + 1 = 1.2, c3 0 + 1 = 1.0 (no ISREL probs): keep c1, c2
    step(t, [[P[1], P[2], P[3]]], [
        gen(rel(0.5), 10, sup(FULL, full=1.0), R),
        gen(rel(0.2), 13, sup(FULL, full=1.0), R),
        gen(11, sup(FULL, full=1.0), R),
    ])
    pending = t.pending_queries()
    assert queries(pending) == [QUESTION + " Ada wrote notes.", QUESTION + " Babbage built engines."]
    # depth 2: under c1: 0.5 -> 0.75, 0.6 -> 0.9; under c2: 1.0 -> 1.2, 0.9 -> 1.08.
    # Top 2 across parents are both c2's children although c1 had the better score.
    reqs = t.requests({pending[0][0]: [P[4], P[5]], pending[1][0]: [P[6], P[7]]})
    assert [r.passage["id"] for r in reqs] == ["p4", "p5", "p6", "p7"]
    t.advance([
        gen(rel(0.5), 11, R),
        gen(rel(0.6), 12, R),
        gen(14, sup(FULL, full=1.0), R),
        gen(rel(0.9), 15, R),
    ])
    pending = t.pending_queries()
    assert queries(pending) == [QUESTION + " He lived in London.", QUESTION + " He designed a computer."]
    reqs = t.requests({pending[0][0]: [P[8]], pending[1][0]: [P[9]]})
    assert all(r.prompt.startswith(PROMPT + "[Relevant] Babbage built engines.[Fully supported]") for r in reqs)
    # depth 3: both 0.5: 1.2 * 0.5 = 0.6 beats 1.08 * 0.5 = 0.54
    t.advance([gen(rel(0.5), 16, EOS), gen(rel(0.5), 16, EOS)])
    res = t.result()
    assert res.score == pytest.approx(0.6)
    assert res.text == "Babbage built engines [1]. He lived in London [2]. He was a mathematician [3]."
    assert [d["id"] for d in res.docs] == ["p2", "p6", "p8"]
    assert t.stats()["requests_per_depth"] == [3, 4, 2]


@pytest.mark.parametrize("beam_width", [1, 2])
def test_beam_ties_keep_the_first_child(beam_width):
    t = tree(beam_width=beam_width, max_depth=2, top_k=2)
    # both 0.5 + 1 = 1.5: the first passage's child wins, in the beam (B=1) and among leaves (B=2)
    step(t, [[P[1], P[2]]], [gen(rel(0.5), 10, sup(FULL, full=1.0), EOS), gen(rel(0.5), 13, sup(FULL, full=1.0), EOS)])
    assert t.result().text == "Ada wrote notes [1]."


# --- (6) ignore_cont --------------------------------------------------------------------------

@pytest.mark.parametrize("ignore_cont, text, docs", [
    (False, "Ada wrote notes [1]. She died in 1852 [2].", ["p1", "p2"]),
    (True, "She died in 1852 [1].", ["p2"]),
])
def test_ignore_cont_drops_unsupported_segments(ignore_cont, text, docs):
    t = tree(beam_width=1, max_depth=3, top_k=1, ignore_cont=ignore_cont)
    # depth 1: [No support / Contradictory], s_sup (0.1 + 0.1) / 1 = 0.2 -> 1.1
    step(t, [[P[1]]], [gen(rel(0.9), 10, sup(NOSUP, full=0.1, part=0.2, nosup=0.7), R)])
    # depth 2: 0.9 + 1 + 0.5 = 2.4 -> path 2.64 (the path is the same either way)
    step(t, [[P[2]]], [gen(rel(0.9), 11, sup(FULL, full=1.0), use(5, (0, 0, 0, 0, 1.0)), EOS)])
    res = t.result()
    assert res.text == text and [d["id"] for d in res.docs] == docs
    assert res.score == pytest.approx(2.64) and res.segments[0]["citation"] == 1


# --- (7) prompt too long ----------------------------------------------------------------------

def _two_open_parents():
    t = tree(beam_width=2, max_depth=4, top_k=2)
    # depth 1: c1 0.8 + 1 = 1.8, c2 0.6 + 1 = 1.6, both open
    step(t, [[P[1], P[2]]], [gen(rel(0.8), 10, sup(FULL, full=1.0), R), gen(rel(0.6), 13, sup(FULL, full=1.0), R)])
    return t


@pytest.mark.parametrize("c2a_rel, text, score", [
    # c2a 0.5 + 1 = 1.5 -> 2.4 beats the stopped c1 path (1.8)
    (0.5, "Babbage built engines [1]. He lived in London [2].", 2.4),
    # c2a 0.05 + 1 = 1.05 -> 1.68 loses to the stopped c1 path (1.8), which is used as it stands
    (0.05, "Ada wrote notes [1].", 1.8),
])
def test_prompt_too_long_stops_one_path(c2a_rel, text, score):
    t = _two_open_parents()
    pending = t.pending_queries()
    reqs = t.requests({pending[0][0]: [P[3], P[4]], pending[1][0]: [P[5], P[6]]})
    assert len(reqs) == 4
    # c1's context no longer fits; c2's children: c2a, and c2b 0.1 -> 0.16
    t.advance(["prompt too long", "prompt too long",
               gen(rel(c2a_rel), 14, sup(FULL, full=1.0), EOS), gen(rel(0.1), 15, EOS)])
    assert t.done
    res = t.result()
    assert res.text == text and res.score == pytest.approx(score)
    assert res.stop_reason == "prompt too long at depth 2"
    assert t.stats()["errors"] == 2 and t.stats()["requests_per_depth"] == [2, 4]


def test_prompt_too_long_at_the_root_gives_an_empty_answer():
    t = tree(top_k=2)
    step(t, [[P[1], P[2]]], ["prompt too long", "prompt too long"])
    res = t.result()
    assert (res.text, res.segments, res.docs, res.depth) == ("", [], [], 0)
    assert res.stop_reason == "prompt too long at depth 1"
    t = tree(top_k=2)
    step(t, [[]], [])  # no passages at all
    assert t.done and t.result().stop_reason == "no passages at depth 1"


# --- (8) retrieve_per_segment ----------------------------------------------------------------

@pytest.mark.parametrize("per_segment", [True, False])
def test_retrieve_per_segment_changes_the_queries(per_segment):
    t = tree(beam_width=1, max_depth=3, top_k=2, retrieve_per_segment=per_segment)
    assert t.pending_queries() == [("root", QUESTION)]
    # depth 1: 0.9 + 1 = 1.9 beats 0.1
    step(t, [[P[1], P[2]]], [gen(rel(0.9), 10, sup(FULL, full=1.0), R), gen(rel(0.1), 13, R)])
    pending = t.pending_queries()
    if per_segment:
        assert queries(pending) == [QUESTION + " Ada wrote notes."]
        reqs = t.requests({pending[0][0]: [P[3], P[4]]})
    else:
        assert pending == []
        reqs = t.requests()  # the root's passages again
    assert [r.passage["id"] for r in reqs] == (["p3", "p4"] if per_segment else ["p1", "p2"])
    evidence = "T3\ntext 3" if per_segment else "T1\ntext 1"
    context = PROMPT + "[Relevant] Ada wrote notes.[Fully supported]"
    assert reqs[0].prompt == f"{context}[Retrieval]<paragraph>{evidence}</paragraph>"
    # depth 2: the first passage's child wins (1.9 vs 0.1)
    t.advance([gen(rel(0.9), 11, sup(FULL, full=1.0), EOS), gen(rel(0.1), 12, EOS)])
    res = t.result()
    if per_segment:
        assert res.citations == [1, 2] and [d["id"] for d in res.docs] == ["p1", "p3"]
    else:  # the same passage cited twice keeps its number
        assert res.citations == [1, 1] and [d["id"] for d in res.docs] == ["p1"]
    assert t.stats()["queries"] == (2 if per_segment else 1)
