"""Unit tests of the pure Self-RAG algorithm, with expected values worked out by hand."""

import math

import pytest

from pipeline.selfrag import prompts, scoring, selection, tokens as T
from pipeline.selfrag.scoring import Continuation, ScoreWeights

# Scripted token ids: the 15 reflection tokens get 100..114; ordinary words get small ids.
IDS = T.ReflectionIds.from_lookup({tok: 100 + i for i, tok in enumerate(T.ALL_REFLECTION_TOKENS)}.get)
R, N, REL, IRR = IDS[T.RETRIEVAL], IDS[T.NO_RETRIEVAL], IDS[T.RELEVANT], IDS[T.IRRELEVANT]
FULL, PART, NOSUP = IDS[T.FULLY_SUPPORTED], IDS[T.PARTIALLY_SUPPORTED], IDS[T.NO_SUPPORT]
U = [IDS[t] for t in T.UTILITY]
WORD_A, WORD_B, EOS = 7, 8, 2
ln = math.log


# --- tokens and prompts -------------------------------------------------------------------

def test_reflection_ids_refuse_a_tokenizer_without_them():
    lookup = {tok: i for i, tok in enumerate(T.ALL_REFLECTION_TOKENS) if tok != T.RELEVANT}.get
    with pytest.raises(ValueError, match=r"\[Relevant\]"):
        T.ReflectionIds.from_lookup(lookup)
    with pytest.raises(ValueError, match="reflection tokens"):
        T.ReflectionIds.from_lookup(lambda tok: 0, unk_id=0)
    assert len(IDS.all_ids) == 15 and len(set(IDS.all_ids)) == 15


def test_prompt_formats_are_exact():
    assert prompts.format_prompt("Who?") == "### Instruction:\nWho?\n\n### Response:\n"
    assert prompts.format_prompt("Who?", "ctx") == "### Instruction:\nWho?\n\n### Input:\nctx\n\n### Response:\n"
    assert prompts.evidence_prompt("P", "Title", "Body") == "P[Retrieval]<paragraph>Title\nBody</paragraph>"
    assert prompts.no_evidence_prompt("P") == "P[No Retrieval]"


ASQA = ("Answer the following question. The question may be ambiguous and have multiple correct answers, "
        "and in that case, you have to provide a long-form answer including all correct answers.")


def test_reference_templates_are_the_evaluation_scripts_strings():
    """The default style, character for character as the authors' scripts build them."""
    assert prompts.format_prompt("Water is wet.", task="fever") == (
        "### Instruction:\nIs the following statement correct or not? Say true if it's correct; otherwise say "
        "false.\n\n## Input:\n\nWater is wet.\n\n### Response:\n")
    assert prompts.format_prompt("Q?\nA: x\nB: y\nC: z", task="arc_c") == (
        "### Instruction:\nGiven four answer candidates, A, B, C and D, choose the best answer choice."
        "\n\n### Input:\nQ?\nA: x\nB: y\nC: z\n\n### Response:\n")
    assert prompts.format_prompt("Which?", task="asqa") == (
        f"### Instruction:\n{ASQA}\n\n## Input:\n\nWhich?\n\n### Response:\n")
    assert prompts.format_prompt("Which?", task="asqa", long_form=True) == (
        f"### Instruction:\n{ASQA}## Input:\n\nWhich?\n\n### Response:\n")
    assert prompts.format_prompt("Who?", task="popqa", long_form=True) == "### Instruction:\nWho?\n\n### Response:\n"


def test_paper_templates_are_table_5():
    assert prompts.task_instruction("Water is wet.", "fever", "paper") == (
        "Is the following statement correct or not? Say true if it's correct; otherwise say false. Don't "
        'capitalize or add periods, just say "true" or "false".\n\nWater is wet.')
    assert prompts.task_instruction("Q?\nA: x", "arc_c", "paper") == (
        "Given four answer candidates, A, B, C and D, choose the best answer choice. Please answer with the "
        "capitalized alphabet only, without adding any extra phrase or period.\n\nQ?\nA: x")
    for long_form in (False, True):
        assert prompts.task_instruction("Which?", "asqa", "paper", long_form) == f"{ASQA}\n\nWhich?"
    with pytest.raises(ValueError, match="unknown prompt style 'papers'"):
        prompts.task_instruction("Who?", "fever", "papers")


def test_task_templates():
    assert prompts.task_instruction("Ada Lovelace", "factscore") == "Tell me a bio about Ada Lovelace"
    assert prompts.task_instruction("Tell me a bio about Ada", "factscore") == "Tell me a bio about Ada"
    assert prompts.task_instruction("Which?", "asqa").startswith("Answer the following question. The question may")
    assert prompts.task_instruction("Who?", "popqa") == "Who?"
    assert prompts.task_instruction("Who?", None) == "Who?"
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        prompts.task_instruction("Who?", "nope")


def test_clean_answer_strips_reflection_tokens_and_markup():
    raw = "[Relevant]Dorsk is the capital.[Fully supported][Utility:5]</s>"
    assert selection.clean_answer(raw) == "Dorsk is the capital."
    assert selection.clean_answer("<paragraph>x</paragraph> true[Utility:4]") == "x true"


def test_short_form_answers_drop_one_leading_hash_or_colon():
    assert selection.short_form_answer("[Relevant]: true[Utility:5]") == "true"
    assert selection.short_form_answer("#B[Utility:4]</s>") == "B"
    assert selection.short_form_answer("##x") == "#x"
    assert selection.short_form_answer("a: b") == "a: b"


def test_closed_set_groups_merge_whitespace_and_prefix_variants():
    """" true", "true" and ":true" are one answer (the reference script keeps three): their
    summed 0.3 + 0.3 + 0.3 beats "false" at 0.8."""
    answers = [selection.short_form_answer(r) for r in (" true", "false", "true[Utility:5]", ":true")]
    chosen = selection.select_answer(answers, [0.3, 0.8, 0.3, 0.3], closed_set=True)
    assert chosen.answer == "true" and chosen.answer_scores == pytest.approx({"true": 0.9, "false": 0.8})


# --- retrieval decision -------------------------------------------------------------------

def test_retrieval_probability_uses_probabilities():
    # p_R = 0.3, p_N = 0.1 -> 0.3 / 0.4 = 0.75
    assert scoring.retrieval_probability({R: ln(0.3), N: ln(0.1)}, IDS) == pytest.approx(0.75)


def test_retrieval_probability_with_a_token_not_returned():
    # [No Retrieval] missing counts as probability 0 -> 0.3 / 0.3 = 1.0
    assert scoring.retrieval_probability({R: ln(0.3)}, IDS) == pytest.approx(1.0)
    # [Retrieval] missing -> 0 / 0.1 = 0.0; both missing -> 0.0 (no evidence for retrieval)
    assert scoring.retrieval_probability({N: ln(0.1)}, IDS) == 0.0
    assert scoring.retrieval_probability({}, IDS) == 0.0


def test_reference_rule_divides_logprobs():
    # -1 / (-1 + -3) = 0.25, while the paper rule gives e^-1 / (e^-1 + e^-3) = 0.8808
    first = {R: -1.0, N: -3.0}
    assert scoring.retrieval_probability(first, IDS, "reference_logprob_ratio") == pytest.approx(0.25)
    assert scoring.retrieval_probability(first, IDS) == pytest.approx(0.880797, abs=1e-6)
    # missing [No Retrieval] stands in as -100: -1 / -101
    assert scoring.retrieval_probability({R: -1.0}, IDS, "reference_logprob_ratio") == pytest.approx(1 / 101)
    with pytest.raises(ValueError, match="unknown retrieval rule"):
        scoring.retrieval_probability(first, IDS, "other")


def test_decide_retrieval_modes_and_strict_threshold():
    assert scoring.decide_retrieval("adaptive", 0.25, 0.2) is True
    assert scoring.decide_retrieval("adaptive", 0.2, 0.2) is False  # strictly greater
    assert scoring.decide_retrieval("always", None, 0.2) is True
    assert scoring.decide_retrieval("never", 0.99, 0.2) is False
    with pytest.raises(ValueError, match="unknown retrieval mode"):
        scoring.decide_retrieval("sometimes", 0.5, 0.2)


# --- critique scores ----------------------------------------------------------------------

def _cont(token_ids, logprobs, cumulative=0.0):
    return Continuation(token_ids=token_ids, logprobs=logprobs, cumulative_logprob=cumulative)


# [Relevant] a b [Fully supported] [Utility:5] </s>
FULL_CONT = _cont(
    [REL, WORD_A, WORD_B, FULL, U[4], EOS],
    [
        {REL: ln(0.6), IRR: ln(0.2)},
        {FULL: ln(0.9)},  # an ISSUP prob at a position whose sampled token is not ISSUP: ignored
        {},
        {FULL: ln(0.5), PART: ln(0.3), NOSUP: ln(0.2)},
        dict(zip(U, map(ln, (0.1, 0.1, 0.2, 0.2, 0.4)))),
        {},
    ],
    cumulative=-6.0,
)


def test_relevance_score():
    assert scoring.relevance_score(FULL_CONT, IDS) == pytest.approx(0.6 / 0.8)  # 0.75
    assert scoring.relevance_score(_cont([REL], [{REL: ln(0.4)}]), IDS) == pytest.approx(1.0)
    assert scoring.relevance_score(_cont([], []), IDS) == 0.0


def test_support_score_with_and_without_issup_token():
    # (0.5 + 0.5 * 0.3) / (0.5 + 0.3 + 0.2) = 0.65
    assert scoring.support_score(FULL_CONT, IDS) == pytest.approx(0.65)
    no_issup = _cont([REL, WORD_A, EOS], [{REL: 0.0}, {FULL: ln(0.9)}, {}])
    assert scoring.support_score(no_issup, IDS) == 0.0
    # partial generated first; its position has only partial and no-support returned:
    # (0 + 0.5 * 0.2) / (0.2 + 0.2) = 0.25
    partial = _cont([WORD_A, PART, FULL], [{}, {PART: ln(0.2), NOSUP: ln(0.2)}, {FULL: 0.0}])
    assert scoring.support_score(partial, IDS) == pytest.approx(0.25)


def test_utility_score_with_and_without_utility_token():
    # -1*0.1 - 0.5*0.1 + 0*0.2 + 0.5*0.2 + 1*0.4 = 0.35, S = 1.0
    assert scoring.utility_score(FULL_CONT, IDS) == pytest.approx(0.35)
    # only [Utility:1] = 0.25 and [Utility:5] = 0.5 returned: (-0.25 + 0.5) / 0.75 = 1/3
    sparse = _cont([U[0]], [{U[0]: ln(0.25), U[4]: ln(0.5)}])
    assert scoring.utility_score(sparse, IDS) == pytest.approx(1 / 3)
    assert scoring.utility_score(_cont([WORD_A, EOS], [{U[4]: 0.0}, {}]), IDS) == 0.0


def test_sequence_score():
    assert scoring.sequence_score(FULL_CONT) == pytest.approx(-1.0)  # -6 / 6 tokens
    assert scoring.sequence_score(_cont([], [], cumulative=-2.0)) == pytest.approx(-2.0)


def test_final_score_with_and_without_seqscore():
    # 1.0 * 0.75 + 1.0 * 0.65 + 0.5 * 0.35 = 1.575
    paper = ScoreWeights()
    assert (paper.w_rel, paper.w_sup, paper.w_use) == (1.0, 1.0, 0.5)
    assert scoring.final_score(0.75, 0.65, 0.35, -1.5, paper) == pytest.approx(1.575)
    # + exp(-1.5) = 0.2231302 -> 1.7981302
    with_seq = ScoreWeights(use_seqscore=True)
    assert scoring.final_score(0.75, 0.65, 0.35, -1.5, with_seq) == pytest.approx(1.7981302, abs=1e-7)
    scores = scoring.score_continuation(FULL_CONT, IDS, paper)
    assert (scores.s_rel, scores.s_sup, scores.s_use, scores.seq) == pytest.approx((0.75, 0.65, 0.35, -1.0))
    assert scores.final == pytest.approx(1.575)


# --- selection ------------------------------------------------------------------------------

def test_open_selection_takes_the_best_and_the_earliest_on_ties():
    assert selection.select_open([0.2, 0.9, 0.9]) == 1
    chosen = selection.select_answer(["a", "b", "c"], [0.2, 0.9, 0.9], closed_set=False)
    assert (chosen.answer, chosen.index, chosen.answer_scores) == ("b", 1, None)


def test_closed_set_aggregation_sums_identical_answers():
    # true: 0.5 + 0.6 = 1.1 beats false: 0.9, although false is the single best candidate
    chosen = selection.select_closed(["true", "false", "true"], [0.5, 0.9, 0.6])
    assert chosen.answer == "true" and chosen.index == 2
    assert chosen.answer_scores == pytest.approx({"true": 1.1, "false": 0.9})


def test_closed_set_tie_goes_to_the_answer_seen_first():
    assert selection.select_closed(["false", "true"], [0.7, 0.7]).answer == "false"
    # true: 1.0 vs false: 0.5 + 0.5 = 1.0 -> true, seen first
    tie = selection.select_closed(["true", "false", "false"], [1.0, 0.5, 0.5])
    assert (tie.answer, tie.index) == ("true", 0)
    with pytest.raises(ValueError):
        selection.select_closed([], [])


def test_a_passage_is_tokenized_once_and_its_evidence_ids_are_what_the_pieces_give(monkeypatch):
    """The critique and the long-form trees put a passage into many prompts: its evidence ids
    are kept (``PASSAGE_CACHE_SIZE`` passages), and equal what tokenizing its pieces gives."""
    ids = T.ReflectionIds({token: 1000 + i for i, token in enumerate(T.ALL_REFLECTION_TOKENS)} | {
        T.PARAGRAPH_OPEN: 2000, T.PARAGRAPH_CLOSE: 2001, T.RETRIEVAL: 2002, T.NO_RETRIEVAL: 2003})
    calls = []

    def encode_text(text):  # one id per character: readable expectations
        calls.append(text)
        return [ord(c) for c in text]

    tokens = prompts.PromptTokens(encode_text, ids)
    first = tokens.evidence([7, 8], "T", "ab")
    assert first == [7, 8, 2002, 2000, ord("T"), ord("\n"), ord("a"), ord("b"), 2001]
    assert first == [7, 8] + tokens.encode(prompts.evidence_pieces("T", "ab"))
    calls.clear()
    assert tokens.evidence([9], "T", "ab") == [9] + first[2:] and calls == []  # kept, not tokenized again
    assert tokens.evidence([9], None, "ab") == [9, 2002, 2000, ord("\n"), ord("a"), ord("b"), 2001]
    monkeypatch.setattr(prompts, "PASSAGE_CACHE_SIZE", 2)
    for text in ("x", "y", "z", "ab"):  # beyond the cache's size it starts over, and stays right
        assert tokens.evidence([], "T", text) == tokens.encode(prompts.evidence_pieces("T", text))
    assert len(tokens._passages) <= 2
