"""Tests of ``python -m jobs.evaluate``: metrics on hand-made annotated rows, the official file
layouts, refusals, the synthetic suite and the report. No vLLM: annotated output is written here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from jobs.evaluate import main
from pipeline.evaluation import layouts, synthetic
from pipeline.evaluation.layouts import LayoutError
from pipeline.evaluation.metrics import (TokenInfo, exact, fever_label, is_correct, match, report_runs,
                                         summarize, well_formed)
from pipeline.evaluation.outputs import read_output
from pipeline.evaluation.tokens import token_info
from pipeline.infra.io import Storage
from pipeline.output.folder import OutputFolder
from pipeline.run import evaluate as evaluation_run
from pipeline.selfrag.prompts import TASK_INSTRUCTIONS, format_prompt
from pipeline.stages.columns import OUTPUT_TYPES

#: The storage of the local files these tests read.
LOCAL = Storage()
# Fake token ids of the hand-made rows: 10 [Relevant], 11 [Irrelevant], 30..34 [Utility:1..5],
# 2 end of sequence, 40/41 words.
TOKENS = TokenInfo(relevant=10, irrelevant=11, utility=(30, 31, 32, 33, 34), eos=(2,))
INPUT_TYPES = {
    "id": pa.string(), "instruction": pa.string(), "task": pa.string(), "answers": pa.list_(pa.string()),
    "kind": pa.string(), "probe": pa.string(), "gold_passage_id": pa.string(),
    "original_value": pa.string(), "swapped_value": pa.string(),
}
SCHEMA = pa.schema(list(INPUT_TYPES.items()) + list(OUTPUT_TYPES.items()))


def cand(pid: str, raw: str, token_ids: list[int] | None = None, error: str | None = None) -> dict:
    return {"passage_id": pid, "raw": raw, "answer": raw, "s_rel": 0.5, "s_sup": 0.0, "s_use": 0.0,
            "seq": -1.0, "final": 0.5, "error": error, "token_ids": token_ids,
            "cumulative_logprob": None, "reflection_logprobs": None}


def row(rid: str, answers, answer, *, task=None, retrieved=False, error=None, raw=None,
        candidates=None, passages=(), best=None, **extra) -> dict:
    """One output row; ``raw`` defaults to the answer; retrieved rows get their candidates."""
    out = {k: None for k in SCHEMA.names}
    out.update(id=rid, instruction=f"question {rid}", task=task, answers=answers, answer=answer,
               answer_raw=None if error else (raw if raw is not None else answer),
               retrieved=None if error else retrieved, error=error,
               candidates=candidates if candidates is not None else ([] if not error else None),
               passages=[{"id": p, "title": p, "text": "t", "retrieval_score": None} for p in passages] or None,
               best_passage_id=best, model="not-a-model", run_id="r")
    out.update(extra)
    return out


def write_output(dest: Path, rows: list[dict], mode: str | None = None) -> Path:
    """An annotated output directory as the annotation job writes it (one shard, _config.yaml)."""
    dest.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), dest / "part-00000.parquet")
    if mode:
        (dest / "_config.yaml").write_text(f"selfrag:\n  mode: {mode}\n")
    return dest


# ----------------------------------------------------------------------------- metrics

def test_match_is_a_case_insensitive_substring_test_after_stripping():
    assert match("The capital is DORSK.", [" dorsk "])
    assert match("It is 15 km", ["5"])  # plain substring, as in the reference scripts
    assert not match("It is Quen.", ["Quenic"])
    assert not match(None, ["Dorsk"]) and not match("anything", ["", "  "])
    assert match("hello! there", ["Hello!"])


def test_exact_accuracy_of_closed_set_answers():
    assert exact("True.", ["true"], "fever") and exact(" false ", ["REFUTES"], "fever")
    assert exact("true", ["SUPPORTS"], "fever") and not exact("true", ["false"], "fever")
    assert not exact("it is true", ["true"], "fever")  # exact, not substring
    assert exact("b", ["B"], "arc_c") and exact("C.", ["C"], "arc_c")
    assert not exact("C: Dorsk", ["C"], "arc_c") and not exact(None, ["C"], "arc_c")
    assert fever_label("Supported") == "true" and fever_label(False) == "false"
    assert fever_label("mixture") is None and fever_label(2) is None
    # no gold: not scored; the task picks the metric
    assert is_correct("x", None, None) is None and is_correct("x", [""], "qa") is None


def test_the_scripts_substring_metric_for_closed_set_tasks():
    """--closed-set-metric substring: case-sensitive, unstripped, SUPPORTS/REFUTES mapped."""
    def sub(answer, gold, task):
        return is_correct(answer, [gold], task, closed_metric="substring")
    assert sub("it is true", "true", "fever") is True  # exact accuracy says False
    assert sub("True", "true", "fever") is False        # exact accuracy says True
    assert sub("SUPPORTS.", "true", "fever") is True and sub("REFUTES", "true", "fever") is False
    assert sub("B", "B", "arc_c") is True and sub("b", "B", "arc_c") is False
    assert sub("A or B", "B", "arc_c") is True
    assert sub("Paris", "paris", "popqa") is True  # free-form rows keep the paper's match
    rep = report_runs({"always": [{"answer": "it is true", "answers": ["true"], "task": "fever", "retrieved": True}]},
                      closed_metric="substring")
    assert rep["accuracy_always"] == 1.0 and rep["per_task"]["always"]["fever"]["metric"] == "substring"
    assert is_correct("it is true", ["true"], None) is True and is_correct("it is true", ["true"], "fever") is False


def handmade_rows() -> list[dict]:
    return [
        # free-form: correct (match), retrieved, well formed ([Utility:2] then eos)
        row("q1", ["Dorsk"], "The capital is dorsk.", retrieved=True, passages=["p1"], best="p1",
            candidates=[cand("p1", "The capital is dorsk.", [10, 40, 31, 2])]),
        # free-form: wrong ("Quenic" is not in "It is Quen."), answered without evidence
        row("q2", ["Velmora", "Quenic"], "It is Quen.", raw="It is Quen.[Utility:4]"),
        # free-form: error row, counts as wrong, has no retrieval decision
        row("q3", ["Hello!"], None, error="engine error: boom"),
        # no gold: not scored
        row("q4", None, "x"),
        # fever: "True." normalises to "true": correct, no evidence
        row("f1", ["true"], "True.", task="fever", raw="True.[Utility:5]"),
        # fever: wrong, retrieved, not well formed (no utility token before the end)
        row("f2", ["false"], "true", task="fever", retrieved=True, passages=["p2"], best="p2",
            candidates=[cand("p2", "true", [40, 2])]),
        # arc_c: "b" is the letter B: correct; token ids not kept
        row("a1", ["B"], "b", task="arc_c", retrieved=True, passages=["p3"], best="p3", raw="b[Utility:5]",
            candidates=[cand("p3", "b[Utility:5]")]),
        # arc_c: exact, so "C: Dorsk" is wrong
        row("a2", ["C"], "C: Dorsk", task="arc_c"),
    ]


def test_per_task_and_overall_figures_of_a_handmade_annotated_parquet(tmp_path):
    out = write_output(tmp_path / "out", handmade_rows(), mode="adaptive")
    rows = read_output(OutputFolder(str(out), LOCAL))
    assert [r["id"] for r in rows] == ["q1", "q2", "q3", "q4", "f1", "f2", "a1", "a2"]
    summary = summarize(rows)
    free, fever, arc = (summary["groups"][t] for t in ("free-form", "fever", "arc_c"))
    # free-form: q1 q2 q3 q4; q4 unscored; q1 right, q2 and q3 (error) wrong -> 1/3;
    # decisions q1 (retrieved) q2 q4 (q3 failed before it) -> 1/3
    assert (free["rows"], free["errors"], free["scored"], free["correct"]) == (4, 1, 3, 1)
    assert free["accuracy"] == pytest.approx(1 / 3) and free["retrieval_rate"] == pytest.approx(1 / 3)
    assert free["metric"] == "match"
    # fever: f1 right, f2 wrong; f2 retrieved -> 1/2 and 1/2
    assert (fever["accuracy"], fever["retrieval_rate"], fever["metric"]) == (0.5, 0.5, "exact")
    # arc_c: a1 right, a2 wrong; a1 retrieved
    assert (arc["accuracy"], arc["retrieval_rate"], arc["metric"]) == (0.5, 0.5, "exact")
    # overall: 8 rows, 1 error, 7 scored, 3 correct; 7 decisions, 3 retrieved
    overall = summary["overall"]
    assert (overall["rows"], overall["errors"], overall["scored"], overall["correct"]) == (8, 1, 7, 3)
    assert overall["accuracy"] == pytest.approx(3 / 7) and overall["retrieval_rate"] == pytest.approx(3 / 7)
    assert overall["metric"] == "mixed"

    rep = report_runs({"adaptive": rows}, TOKENS)
    assert rep["accuracy_adaptive"] == round(3 / 7, 4) and rep["error_rows_adaptive"] == 1
    assert rep["rows_adaptive"] == 8 and rep["retrieval_rate_adaptive"] == round(3 / 7, 4)
    assert rep["per_task"]["adaptive"]["fever"]["accuracy"] == 0.5
    # token ids recorded for q1 (well formed) and f2 (not): 1/2. No ids for q2 f1 a1 a2 q4
    # (q3 failed): text proxy q2 f1 a1 end with [Utility:k], a2 q4 do not -> 3/5
    assert (rep["well_formed_rate"], rep["well_formed_checked"]) == (0.5, 2)
    assert (rep["well_formed_unchecked"], rep["well_formed_text_proxy_unchecked"]) == (5, 0.6)


# ----------------------------------------------------------------------------- synthetic report

def synthetic_runs() -> dict[str, list[dict]]:
    """Three small runs of the synthetic suite; expected figures are worked out in the test."""
    k = dict(kind="knowledge")
    n = dict(kind="no_knowledge")
    always = [
        row("k1", ["Dorsk"], "Dorsk", retrieved=True, passages=["p1", "p2"], best="p1", gold_passage_id="p1",
            probe="plain", candidates=[cand("p1", "Dorsk", [10, 40, 34, 2]), cand("p2", "Other", [11, 2])], **k),
        row("k2", ["Tash"], "no idea", retrieved=True, passages=["p4", "p3"], best="p4", gold_passage_id="p3",
            probe="plain", candidates=[cand("p4", "no idea", [11, 40, 41]), cand("p3", "Tash", [10, 2])], **k),
        row("n1", ["Hello!"], "hello! there", retrieved=True, passages=["p9"], best="p9", probe="plain",
            candidates=[cand("p9", "hello! there", [40, 33, 2])], **n),
        row("k1#gold", ["Dorsk"], "Dorsk", retrieved=True, passages=["p1"], best="p1", probe="gold",
            gold_passage_id="p1", candidates=[cand("p1", "Dorsk", [10, 40, 30, 2])], **k),
        row("k2#gold", ["Tash"], "x", retrieved=True, passages=["p3"], best="p3", probe="gold",
            gold_passage_id="p3", candidates=[cand("p3", "x", [11, 40, 2])], **k),
        row("k1#unrelated", ["Dorsk"], "y", retrieved=True, passages=["p7"], best="p7", probe="unrelated",
            candidates=[cand("p7", "y", [11, 30, 2])], **k),
        row("k2#unrelated", ["Tash"], None, error="engine error: boom", probe="unrelated", **k),
        row("k1#counterfactual", ["Zorvik"], "It is Zorvik", retrieved=True, passages=["p1~cf"], best="p1~cf",
            probe="counterfactual", original_value="Dorsk", swapped_value="Zorvik",
            candidates=[cand("p1~cf", "It is Zorvik", [10, 40, 31, 2])], **k),
        row("k2#counterfactual", ["Vel"], "Tash", retrieved=True, passages=["p3~cf"], best="p3~cf",
            probe="counterfactual", original_value="Tash", swapped_value="Vel",
            candidates=[cand("p3~cf", "Tash", [10, 40, 31])], **k),
    ]
    adaptive = [
        row("k1", ["Dorsk"], "Dorsk", raw="Dorsk[Utility:5]", gold_passage_id="p1", probe="plain",
            retrieval_prob=0.1, **k),
        row("k2", ["Tash"], "Tash", retrieved=True, passages=["p3", "p4"], best="p3", gold_passage_id="p3",
            probe="plain", retrieval_prob=0.9, candidates=[cand("p3", "Tash", [10, 40, 32, 2]),
                                                           cand("p4", "no", [11, 2])], **k),
        row("n1", ["Hello!"], "hi", probe="plain", retrieval_prob=0.05, **n),
    ]
    never = [
        row("k1", ["Dorsk"], "x", gold_passage_id="p1", probe="plain", **k),
        row("k2", ["Tash"], "Tash", raw="Tash[Utility:4]", gold_passage_id="p3", probe="plain", **k),
        row("n1", ["Hello!"], "Hello!", raw="Hello![Utility:5]", probe="plain", **n),
    ]
    return {"adaptive": adaptive, "never": never, "always": always}


EXPECTED_SYNTHETIC = {
    # knowledge accuracy: adaptive k1 k2 right; never k2 right; always k1 right, k2 wrong
    "accuracy_adaptive": 1.0, "accuracy_never": 0.5, "accuracy_always": 0.5,
    # no-knowledge: "hi" wrong; "Hello!" right; "hello! there" contains "hello!"
    "accuracy_adaptive_no_knowledge": 0.0, "accuracy_never_no_knowledge": 1.0,
    "accuracy_always_no_knowledge": 1.0,
    "retrieval_rate_knowledge": 0.5, "retrieval_rate_no_knowledge": 0.0,
    # adaptive decisions: k1 did not retrieve (wrong), k2 did, n1 did not -> 2/3 either way
    # (retrieval_prob 0.1, 0.9, 0.05 against 0.5)
    "retrieval_decision_right": 0.6667, "retrieval_decision_right_first_token": 0.6667,
    "error_rows_always": 1, "error_rows_never": 0,
    # gold probes: k1 first token 10 [Relevant], k2 11 -> 1/2; gold answer matched by k1 only
    "relevant_on_gold": 0.5, "accuracy_with_gold_ctx": 0.5,
    # unrelated: k1 first token [Irrelevant]; k2 is an error row and counts as a miss
    "irrelevant_on_unrelated": 0.5,
    # counterfactual: k1 says the swapped value, k2 the original
    "counterfactual_follow_rate": 0.5, "counterfactual_original_rate": 0.5,
    # always, plain knowledge: k1 best = gold, k2 not; gold in both top-k; index ranked gold first for k1
    "gold_ranked_first": 0.5, "gold_in_top_k": 1.0, "gold_retrieved_first": 0.5,
    "gold_ranked_first_adaptive": 1.0,  # adaptive k2 retrieved and chose p3, its gold
    # token ids of chosen candidates, always: k1 n1 gold-k1 unrelated-k1 cf-k1 well formed,
    # k2 gold-k2 cf-k2 not (the error row is skipped) -> 5/8; adaptive k2 well formed -> 6/9.
    # No ids: adaptive k1 n1, never k1 k2 n1; text proxy true for adaptive k1, never k2 n1 -> 3/5
    "well_formed_rate_always": 0.625, "well_formed_rate": 0.6667, "well_formed_checked": 9,
    "well_formed_unchecked": 5, "well_formed_text_proxy_unchecked": 0.6,
    "n_knowledge": 2, "n_no_knowledge": 1, "n_probe_gold": 2, "n_probe_unrelated": 2,
    "n_probe_counterfactual": 2, "probe_basis": "token_ids",
}


def test_synthetic_report_of_handmade_runs():
    rep = synthetic.report(synthetic_runs(), TOKENS)
    assert {k: rep[k] for k in EXPECTED_SYNTHETIC} == EXPECTED_SYNTHETIC


def test_synthetic_report_of_missing_modes_is_null_and_probes_fall_back_to_text():
    runs = synthetic_runs()
    rep = synthetic.report({"never": runs["never"]}, None)
    assert rep["accuracy_never"] == 0.5 and rep["accuracy_always"] is None and rep["accuracy_adaptive"] is None
    assert rep["relevant_on_gold"] is None and rep["gold_ranked_first"] is None
    # without a tokenizer, "first token [Relevant]" is read from the raw text
    gold = [dict(r) for r in runs["always"] if r["probe"] == "gold"]
    gold[0]["candidates"] = [cand("p1", "[Relevant]Dorsk[Utility:5]", None)]
    gold[1]["candidates"] = [cand("p3", "[Irrelevant]x", None)]
    assert synthetic.report({"always": gold}, None)["relevant_on_gold"] == 0.5


def test_cli_scores_existing_outputs_and_prints_the_report_as_the_last_line(tmp_path, monkeypatch, capsys):
    dirs = [write_output(tmp_path / mode, rows, mode) for mode, rows in synthetic_runs().items()]
    monkeypatch.setattr(evaluation_run, "token_info", lambda storage, model: TOKENS)
    args = [arg for d in dirs for arg in ("--annotated", str(d))]
    assert main(args + ["--workdir", str(tmp_path / "w")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    printed = json.loads(lines[-1])
    assert {k: printed[k] for k in EXPECTED_SYNTHETIC} == EXPECTED_SYNTHETIC
    assert "relevant_on_gold" in "\n".join(lines[:-1])  # the table comes first
    assert json.loads((tmp_path / "w" / "annotated" / "report.json").read_text())["accuracy_never"] == 0.5


def test_tokenizer_ids_of_the_committed_model():
    from transformers import AutoTokenizer

    tokens = token_info(LOCAL, str(REPO / "models" / "tiny-selfrag"))
    tok = AutoTokenizer.from_pretrained(REPO / "models" / "tiny-selfrag")
    assert tokens.relevant == tok.convert_tokens_to_ids("[Relevant]")
    assert tokens.utility == tuple(tok.convert_tokens_to_ids(f"[Utility:{k}]") for k in range(1, 6))
    assert tok.eos_token_id in tokens.eos
    assert well_formed([row("x", ["a"], "a", retrieved=True, best="p", passages=["p"],
                            candidates=[cand("p", "a", [5, tokens.utility[4], tok.eos_token_id])])],
                       tokens)["rate"] == 1.0


# ----------------------------------------------------------------------------- layouts

def write_lines(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_jsonl_question_answers_with_ctxs(tmp_path):
    path = write_lines(tmp_path / "popqa.jsonl", [
        {"id": 7, "question": "Who founded Tashkin?", "answers": ["Dorvel", "Dorv"], "s_wiki_title": "x",
         "ctxs": [{"id": "d1", "title": "Tashkin", "text": "Tashkin was founded by Dorvel.", "score": "1.5"},
                  {"title": "Other", "text": "Unrelated."}]},
        {"question": "What is the capital of Velmora?", "answers": "Dorsk"},
    ])
    layout, rows = layouts.load_file(LOCAL, path, task="popqa")
    assert layout == "qa"
    assert rows[0] == {
        "id": "7", "instruction": "Who founded Tashkin?", "input": None, "task": "popqa",
        "answers": ["Dorvel", "Dorv"], "source": "popqa.jsonl",
        "ctxs": [{"id": "d1", "title": "Tashkin", "text": "Tashkin was founded by Dorvel.", "score": 1.5},
                 {"id": None, "title": "Other", "text": "Unrelated.", "score": None}]}
    assert rows[1]["id"] == "popqa:1" and rows[1]["answers"] == ["Dorsk"] and rows[1]["ctxs"] is None


@pytest.mark.parametrize("name, record, task, prompt", [
    ("popqa_longtail_w_gs.jsonl", {"id": 1, "question": "What is Tashkin's occupation?", "answers": ["poet"],
                                   "s_pop": 12, "ctxs": [{"id": "1", "title": "T", "text": "x", "score": "1.2",
                                                          "hasanswer": True}]},
     "popqa", "### Instruction:\nWhat is Tashkin's occupation?\n\n### Response:\n"),
    ("triviaqa_test_w_gs.jsonl", {"question": "Which river flows through Dorsk?", "answers": ["Yu", "the Yu"]},
     "triviaqa", "### Instruction:\nWhich river flows through Dorsk?\n\n### Response:\n"),
    ("health_claims_processed.jsonl", {"question": "Vitamin C cures colds.", "answers": ["false"]}, "fever",
     "### Instruction:\nIs the following statement correct or not? Say true if it's correct; otherwise say "
     "false.\n\n## Input:\n\nVitamin C cures colds.\n\n### Response:\n"),
    ("arc_challenge_processed.jsonl", {"id": "Mercury_7", "question": "Which is a metal?", "answerKey": "C",
                                       "choices": {"text": ["wood", "glass", "iron"], "label": ["A", "B", "C"]}},
     None, "### Instruction:\nGiven four answer candidates, A, B, C and D, choose the best answer choice."
           "\n\n### Input:\nWhich is a metal?\nA: wood\nB: glass\nC: iron\n\n### Response:\n"),
])
def test_official_files_give_the_evaluation_scripts_prompts(tmp_path, name, record, task, prompt):
    """A record shaped like each official evaluation file, read with docs/evaluation.md's Table 2
    command options, becomes exactly the prompt the authors' short-form script builds for it
    (ARC with only the choices it has)."""
    _, rows = layouts.load_file(LOCAL, write_lines(tmp_path / name, [record]), task=task)
    assert format_prompt(rows[0]["instruction"], rows[0]["input"], rows[0]["task"]) == prompt
    assert rows[0]["answers"] == ([record["answerKey"]] if "answerKey" in record else record["answers"])


def test_jsonl_instruction_output(tmp_path):
    path = write_lines(tmp_path / "alpaca.jsonl", [
        {"instruction": "Name the capital of Velmora.", "input": "Answer briefly.", "output": "Dorsk"},
        {"instruction": "Is Dorsk a city?", "output": ["yes", "Yes"], "task": "qa"},
    ])
    layout, rows = layouts.load_file(LOCAL, path)
    assert layout == "qa"
    assert (rows[0]["instruction"], rows[0]["input"], rows[0]["answers"], rows[0]["task"]) == (
        "Name the capital of Velmora.", "Answer briefly.", ["Dorsk"], None)
    assert rows[1]["answers"] == ["yes", "Yes"] and rows[1]["task"] == "qa" and rows[1]["input"] is None


def test_arc_choices_and_answer_key(tmp_path):
    instr, paper = TASK_INSTRUCTIONS["reference"]["arc_c"], TASK_INSTRUCTIONS["paper"]["arc_c"]
    path = write_lines(tmp_path / "arc.jsonl", [
        {"id": "Mercury_1", "question": "Which gas do plants take in?",
         "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
         "answerKey": "B"},
        {"id": "NYSED_2", "question": "Which is a metal?",
         "choices": {"text": ["wood", "glass", "iron", "salt"], "label": ["1", "2", "3", "4"]}, "answerKey": "3"},
        # already carrying the task instruction: not repeated
        {"id": "pre", "question": f"{instr}\n\n### Input:\nWhich is wet?",
         "choices": {"text": ["water", "sand"], "label": ["A", "B"]}, "answerKey": "A"},
        {"id": "pre-paper", "question": f"{paper}\n\nWhich is dry?",
         "choices": {"text": ["sand", "rain", "sea", "ice", "dust"], "label": ["A", "B", "C", "D", "E"]},
         "answerKey": "E"},
    ])
    layout, rows = layouts.load_file(LOCAL, path)
    assert layout == "arc"
    assert rows[0]["instruction"] == ("Which gas do plants take in?\nA: oxygen\nB: carbon dioxide\n"
                                      "C: helium\nD: neon")
    assert (rows[0]["task"], rows[0]["answers"], rows[0]["id"]) == ("arc_c", ["B"], "Mercury_1")
    assert rows[1]["instruction"].endswith("\nC: iron\nD: salt") and rows[1]["answers"] == ["C"]
    # only the choices a question has: no empty D line for two, an E line for five
    assert rows[2]["instruction"] == "Which is wet?\nA: water\nB: sand"
    assert rows[3]["instruction"] == "Which is dry?\nA: sand\nB: rain\nC: sea\nD: ice\nE: dust"
    assert rows[3]["answers"] == ["E"]
    prompt = format_prompt(rows[2]["instruction"], rows[2]["input"], rows[2]["task"])
    assert prompt == f"### Instruction:\n{instr}\n\n### Input:\nWhich is wet?\nA: water\nB: sand\n\n### Response:\n"


def test_pubhealth_claims_with_true_false_labels(tmp_path):
    path = write_lines(tmp_path / "health.jsonl", [
        {"claim": "Vitamin C cures colds.", "label": "false"},
        {"claim": "Washing hands reduces infections.", "label": "SUPPORTS"},
        {"claim": "Sleep matters.", "label": True},
    ])
    layout, rows = layouts.load_file(LOCAL, path)
    assert layout == "pubhealth"
    assert [(r["instruction"], r["task"], r["answers"]) for r in rows] == [
        ("Vitamin C cures colds.", "fever", ["false"]),
        ("Washing hands reduces infections.", "fever", ["true"]),
        ("Sleep matters.", "fever", ["true"])]


def test_json_list_and_forced_format(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"question": "Q1?", "claim": "not used", "answers": ["a"]}]))
    assert layouts.load_file(LOCAL, str(path), fmt="qa") == ("qa", [
        {"id": "list:0", "instruction": "Q1?", "input": None, "task": None, "answers": ["a"],
         "ctxs": None, "source": "list.json"}])


def test_bad_pubhealth_label_is_refused_naming_the_row(tmp_path):
    path = write_lines(tmp_path / "health.jsonl", [
        {"claim": "A.", "label": "true"}, {"id": "h2", "claim": "B.", "label": "mixture"}])
    with pytest.raises(LayoutError, match=r"health.jsonl line 2 \(id h2\): label 'mixture' is not a true/false"):
        layouts.load_file(LOCAL, path)
    fever = write_lines(tmp_path / "fever.jsonl", [{"question": "C.", "answers": ["NOT ENOUGH INFO"]}])
    with pytest.raises(LayoutError, match="line 1 .*'NOT ENOUGH INFO' is not a true/false label"):
        layouts.load_file(LOCAL, fever, task="fever")


def test_unknown_layout_and_unreadable_files_are_refused(tmp_path):
    unknown = write_lines(tmp_path / "x.jsonl", [{"text": "a passage", "title": "T"}])
    with pytest.raises(LayoutError, match=r"unknown layout \(keys of the first record: \['text', 'title'\]\)"):
        layouts.load_file(LOCAL, unknown)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "a", "answers": ["b"]}\n{oops\n')
    with pytest.raises(LayoutError, match="line 2 is not valid JSON"):
        layouts.load_file(LOCAL, str(broken))
    with pytest.raises(LayoutError, match="evaluation file not found"):
        layouts.expand(LOCAL, [str(tmp_path / "missing.jsonl")])
    arc = write_lines(tmp_path / "arc.jsonl", [
        {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}])
    with pytest.raises(LayoutError, match="answerKey 'E' is not one of the choice labels"):
        layouts.load_file(LOCAL, arc)
    bad_task = write_lines(tmp_path / "t.jsonl", [{"question": "Q?", "answers": ["a"], "task": "nope"}])
    with pytest.raises(LayoutError, match="unknown task 'nope'"):
        layouts.load_file(LOCAL, bad_task)


def test_converted_shard_is_read_by_the_annotation_job(tmp_path):
    from pipeline.infra.config import load_config
    from pipeline.run.preflight import check_inputs
    from pipeline.stages.prepare import prepare_table

    qa = write_lines(tmp_path / "qa.jsonl", [{"question": "Q?", "answers": ["a"],
                                              "ctxs": [{"id": 1, "title": "T", "text": "x"}]}])
    arc = write_lines(tmp_path / "arc.jsonl", [
        {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}])
    shards = []
    for path, name in zip([qa, arc], layouts.shard_names([qa, arc])):
        shard = tmp_path / "shards" / name
        shard.parent.mkdir(exist_ok=True)
        pq.write_table(layouts.query_table(layouts.load_file(LOCAL, path)[1]), shard)
        shards.append(str(shard))
    cfg = load_config([], [f"input.paths=[{','.join(shards)}]", f"output.path={tmp_path / 'out'}"])
    rows, _, _ = check_inputs(cfg, LOCAL)
    assert sorted(rows.values()) == [1, 1]
    prepared = prepare_table(pq.read_table(shards[1]), shards[1], cfg.input, "m", "r").to_pylist()
    assert prepared[0]["error"] is None
    assert prepared[0]["prompt"].startswith(
        "### Instruction:\n" + TASK_INSTRUCTIONS["reference"]["arc_c"] + "\n\n### Input:\nQ?\nA: a\nB: b\n\n")


def test_cli_refuses_bad_input_before_any_work(tmp_path, capsys):
    unknown = write_lines(tmp_path / "x.jsonl", [{"text": "a passage"}])
    work = tmp_path / "work"
    assert main(["--queries", unknown, "--workdir", str(work)]) == 2
    assert "unknown layout" in capsys.readouterr().err and not work.exists()
    assert main(["--modes", "adaptive,sometimes", "--workdir", str(work)]) == 2
    assert "--modes 'adaptive,sometimes'" in capsys.readouterr().err
    assert main(["--workdir", str(work), "selfrag.mode=never"]) == 2
    assert "selfrag.mode is set by jobs.evaluate" in capsys.readouterr().err
    assert main(["--workdir", str(work), "selfrag.top_k=0"]) == 2
    assert "config key 'selfrag.top_k'" in capsys.readouterr().err
    assert not work.exists()


# ----------------------------------------------------------------------------- synthetic suite

def test_synthetic_suite_probes():
    from pipeline.synthetic.world import build_world

    world = build_world(seed=0)
    suite = synthetic.build_suite(world, max_per_kind=5, seed=0)
    again = synthetic.build_suite(world, max_per_kind=5, seed=0)
    assert suite.plain == again.plain and suite.probes == again.probes  # deterministic
    assert [r["kind"] for r in suite.plain] == ["knowledge"] * 5 + ["no_knowledge"] * 5 + ["long_form"] * 5
    assert {r["task"] for r in suite.plain} == {None, "asqa"}
    assert all((r["task"] == "asqa") == (r["kind"] == "long_form") for r in suite.plain)
    assert all(len(r["answers"]) == 2 for r in suite.plain if r["kind"] == "long_form")
    ids = [r["id"] for r in suite.plain + suite.probes]
    assert len(ids) == len(set(ids))
    heldout = {q["id"] for q in world.questions("heldout")}
    assert {r["id"] for r in suite.plain} <= heldout
    passages = {p["id"]: p for p in world.passages}
    by_probe = {p: [r for r in suite.probes if r["probe"] == p] for p in synthetic.PROBES}
    assert all(len(rows) == 5 for rows in by_probe.values()), suite.skipped
    for r in by_probe["gold"]:
        assert r["ctxs"][0]["id"] == r["gold_passage_id"] and r["ctxs"][0]["text"] == passages[r["gold_passage_id"]]["text"]
    for r in by_probe["unrelated"]:
        assert r["ctxs"][0]["id"] != r["gold_passage_id"] and r["ctxs"][0]["id"] in passages
    for r in by_probe["counterfactual"]:
        text, gold = r["ctxs"][0]["text"], passages[r["gold_passage_id"]]["text"]
        word = re.compile(rf"\b{re.escape(r['original_value'])}\b")
        assert word.search(gold) and not word.search(text)
        assert r["swapped_value"] in text and r["answers"] == [r["swapped_value"]]
        assert r["swapped_value"] != r["original_value"]
    table = synthetic.suite_table(suite.plain)
    assert table.num_rows == 15 and table.schema.field("ctxs").type == layouts.QUERY_SCHEMA.field("ctxs").type


def test_cli_converts_queries_annotates_each_mode_and_scores_per_task(tmp_path, monkeypatch, capsys):
    """The --queries path with the annotation runs replaced by a stand-in that answers every row
    with its first gold answer (the never run: with "x")."""
    qa = write_lines(tmp_path / "popqa.jsonl", [{"question": "Q1?", "answers": ["a"]},
                                                {"question": "Q2?", "answers": ["b"]}])
    arc = write_lines(tmp_path / "arc.jsonl", [
        {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}])
    seen = {}

    def fake_annotate(configs, resume):
        runs = {}
        for mode, cfg in configs.items():
            seen[mode] = (list(cfg.input.paths), cfg.output.path, cfg.selfrag.mode, cfg.output.keep_logprobs)
            rows = [r for p in cfg.input.paths for r in pq.read_table(p).to_pylist()]
            runs[mode] = [{**r, "answer": r["answers"][0] if mode == "always" else "x",
                           "retrieved": mode == "always", "error": None, "answer_raw": "x", "candidates": []}
                          for r in rows]
        return runs, {mode: 0.0 for mode in configs}

    monkeypatch.setattr(evaluation_run, "annotate_all", fake_annotate)
    work = tmp_path / "work"
    assert main(["--queries", qa, "--queries", arc, "--task", "popqa", "--modes", "always,never",
                          "--workdir", str(work), f"retrieval.index_dir={tmp_path / 'no-index'}"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    shards = [str(work / "popqa" / "queries" / n) for n in ("popqa.parquet", "arc.parquet")]
    assert seen == {"always": (shards, str(work / "popqa" / "always"), "always", True),
                    "never": (shards, str(work / "popqa" / "never"), "never", True)}
    assert pq.read_table(shards[1]).to_pylist()[0]["instruction"] == "Q?\nA: a\nB: b"
    assert (rep["accuracy_always"], rep["accuracy_never"]) == (1.0, 0.0)
    assert (rep["retrieval_rate_always"], rep["retrieval_rate_never"], rep["rows_always"]) == (1.0, 0.0, 3)
    assert rep["per_task"]["always"]["popqa"]["rows"] == 2 and rep["per_task"]["always"]["arc_c"]["metric"] == "exact"


#: The figures the end-to-end synthetic evaluation reports from an ``always`` run.
SEVEN = ("accuracy_always", "relevant_on_gold", "irrelevant_on_unrelated", "counterfactual_follow_rate",
         "gold_ranked_first", "gold_in_top_k", "well_formed_rate")


def scripted_always_run(rows: list[dict]) -> list[dict]:
    """What a scripted ``always`` run answers for the synthetic suite's rows (2 knowledge, 2
    no-knowledge, 2 long-form questions, 2 probes of each kind): by kind or probe, and by
    position among those rows (0 or 1)."""
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        group = r["probe"] if r["probe"] != "plain" else r["kind"]
        i = seen[group] = seen.get(group, -1) + 1
        gold, gold_answer = r["gold_passage_id"], r["answers"][0]
        ids = [40, 34, 2]  # words, [Utility:5], end of sequence: well formed
        if group == "knowledge":  # 0: right, gold passage first and chosen; 1: wrong, gold second, not chosen
            answer = f"It is {gold_answer}." if i == 0 else "no idea"
            passages = [gold, "p-x"] if i == 0 else ["p-x", gold]
            best, ids = passages[0], ([40, 34, 2] if i == 0 else [40, 41])  # 1: cut by its budget
        elif group == "no_knowledge":  # 0: right, 1: wrong
            answer, passages, best = (gold_answer if i == 0 else "9"), ["p-y"], "p-y"
        elif group == "gold":  # 0: [Relevant] first and right; 1: [Irrelevant] first and wrong
            answer, passages, best = (gold_answer if i == 0 else "x"), [gold], gold
            ids = [10 if i == 0 else 11, 40, 34, 2]
        elif group == "unrelated":  # 0: [Irrelevant] first; 1: the row failed
            if i == 1:
                out.append({**r, "answer": None, "answer_raw": None, "retrieved": None, "candidates": None,
                            "passages": None, "best_passage_id": None, "answer_token_ids": None,
                            "error": "engine error: boom"})
                continue
            answer, passages, best, ids = "y", [r["ctxs"][0]["id"]], r["ctxs"][0]["id"], [11, 40, 34, 2]
        elif group == "counterfactual":  # 0: follows the swapped passage; 1: says the original, no eos
            answer = r["swapped_value"] if i == 0 else r["original_value"]
            passages, best, ids = [r["ctxs"][0]["id"]], r["ctxs"][0]["id"], ([40, 34, 2] if i == 0 else [40, 34])
        else:  # long form: no token ids; 0's raw text ends with [Utility:5]</s>, 1's does not
            out.append({**r, "answer": " ".join(r["answers"]), "answer_raw": "a [Utility:5]</s>" if i == 0 else "a",
                        "retrieved": True, "candidates": None, "passages": None, "best_passage_id": None,
                        "answer_token_ids": None, "segments": [], "docs": [], "error": None})
            continue
        candidate = {"passage_id": best, "raw": answer, "answer": answer, "error": None, "token_ids": ids}
        out.append({**r, "answer": answer, "answer_raw": answer, "retrieved": True, "candidates": [candidate],
                    "passages": [{"id": p, "title": p, "text": "t", "retrieval_score": None} for p in passages],
                    "best_passage_id": best, "answer_token_ids": ids, "error": None})
    return out


def test_synthetic_cli_with_a_scripted_annotation(tmp_path, monkeypatch, capsys):
    """``--synthetic --modes always`` on the real suite (2 questions of each kind), the annotation
    run replaced by a script (``scripted_always_run``): every figure worked out by hand."""
    seen = {}

    def scripted_annotate(configs, resume):
        assert list(configs) == ["always"]
        rows = [r for p in configs["always"].input.paths for r in pq.read_table(p).to_pylist()]
        seen["ids"] = [r["id"] for r in rows]
        return {"always": scripted_always_run(rows)}, {"always": 0.0}

    monkeypatch.setattr(evaluation_run, "annotate_all", scripted_annotate)
    monkeypatch.setattr(evaluation_run, "token_info", lambda storage, model: TOKENS)
    work = tmp_path / "eval"
    assert main(["--synthetic", "--modes", "always", "--max-per-kind", "2", "--workdir", str(work),
                          f"retrieval.index_dir={tmp_path / 'no-index'}"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(seen["ids"]) == 12 and sum(i.endswith("#gold") for i in seen["ids"]) == 2  # plain rows and probes
    expected = {
        # knowledge: row 0 says its gold answer, row 1 "no idea" -> 1/2; no-knowledge likewise
        "accuracy_always": 0.5, "accuracy_always_no_knowledge": 0.5,
        # gold probes: first token 10 [Relevant] for row 0 only -> 1/2; its answer right, row 1's not
        "relevant_on_gold": 0.5, "accuracy_with_gold_ctx": 0.5,
        # unrelated probes: row 0 starts with 11 [Irrelevant]; row 1 failed and counts as a miss -> 1/2
        "irrelevant_on_unrelated": 0.5,
        # counterfactual probes: row 0 says the swapped value, row 1 the original
        "counterfactual_follow_rate": 0.5, "counterfactual_original_rate": 0.5,
        # knowledge rows: row 0 chose its gold passage, ranked first; row 1 has it second, chose another
        "gold_ranked_first": 0.5, "gold_in_top_k": 1.0, "gold_retrieved_first": 0.5,
        # token ids of the 9 short-form rows that did not fail: knowledge 1 (cut before any [Utility]) and
        # counterfactual 1 ([Utility:5], no eos) are not well formed -> 7/9; the 2 long-form rows have none:
        # by text, row 0 ends with [Utility:5]</s>, row 1 does not -> 1/2
        "well_formed_rate": round(7 / 9, 4), "well_formed_rate_always": round(7 / 9, 4),
        "well_formed_checked": 9, "well_formed_unchecked": 2, "well_formed_text_proxy_unchecked": 0.5,
        # every row that did not fail retrieved (always); the failed row has no decision
        "retrieval_rate_always_knowledge": 1.0, "retrieval_rate_always_long_form": 1.0,
        "error_rows_always": 1, "probe_basis": "token_ids",
        "n_knowledge": 2, "n_no_knowledge": 2, "n_long_form": 2,
        "n_probe_gold": 2, "n_probe_unrelated": 2, "n_probe_counterfactual": 2,
        # modes not run
        "accuracy_never": None, "accuracy_adaptive": None, "long_form_accuracy": None,
    }
    assert {k: rep[k] for k in expected} == expected
    assert set(SEVEN) <= set(expected)


@pytest.mark.integration
@pytest.mark.e2e
def test_synthetic_evaluation_end_to_end_in_always_mode(tmp_path, index_dir, capsys):
    """One real annotation run (vLLM, FAISS, Ray): 2 + 2 + 2 held-out questions (knowledge,
    no-knowledge, long-form) and 6 probe rows."""
    work = tmp_path / "eval"
    code = main(["--synthetic", "--modes", "always", "--max-per-kind", "2", "--workdir", str(work),
                          f"retrieval.index_dir={index_dir}"])
    assert code == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (rep["n_knowledge"], rep["n_no_knowledge"], rep["n_long_form"], rep["n_probe_gold"]) == (2, 2, 2, 2)
    assert rep["accuracy_never"] is None and rep["error_rows_always"] == 0
    assert rep["probe_basis"] == "token_ids" and rep["gold_in_corpus"] == 1.0
    # the figures are those of the rows written (the report itself is checked with hand-worked
    # values on scripted rows: test_synthetic_cli_with_a_scripted_annotation)
    runs = {"always": read_output(OutputFolder(str(work / "synthetic" / "always"), LOCAL))}
    again = synthetic.report(runs, token_info(LOCAL, str(REPO / "models" / "tiny-selfrag")))
    for key in SEVEN:
        assert rep[key] is not None and rep[key] == again[key], key
    # always: every short-form row has token ids; the 2 long-form (tree) rows have none
    assert rep["well_formed_checked"] == 10 and rep["well_formed_unchecked"] == 2
    assert rep["long_form_accuracy"] is None  # a figure of the adaptive run, which did not run
    rows = read_output(OutputFolder(str(work / "synthetic" / "always"), LOCAL))
    assert len(rows) == 12 and all(c["token_ids"] for r in rows if r["kind"] != "long_form" for c in r["candidates"])
    assert all(r["segments"] and r["candidates"] is None for r in rows if r["kind"] == "long_form")
    page = (work / "synthetic" / "report.html").read_text()  # the accuracy table, then the run's figures
    assert "Evaluation: accuracy per task and mode" in page and "Mode always:" in page
    assert f"<td>always</td><td>knowledge</td><td></td><td></td><td class=\"n\">{rep['accuracy_always']:.4g}</td>" in page


def test_long_form_figures_of_handmade_rows():
    def lf(rid, answers, answer, segments, docs, retrieved=True, error=None):
        return {"id": rid, "kind": "long_form", "probe": "plain", "answers": answers, "answer": answer,
                "segments": [{"citation": c, "passage_id": p} for c, p in segments],
                "docs": [{"id": d} for d in docs], "retrieved": retrieved, "error": error,
                "path_depth": 2 if rid == "L2" else len(segments),
                "gold_passage_id": "p1"}

    rows = [
        lf("L1", ["Vel", "Tash"], "A is Vel [1]. B is Tash [1].", [(1, "p1"), (1, "p1")], ["p1"]),
        lf("L2", ["Vel", "Tash"], "A is Vel [1].", [(1, "p2")], ["p2"]),
        lf("L3", ["Vel", "Tash"], "nothing [2].", [(2, "p1")], ["p2", "p1"]),  # [2] cited before [1]
        lf("L4", ["Vel", "Tash"], None, [], [], retrieved=None, error="engine error: boom"),  # a failure
        lf("L5", ["Vel", "Tash"], "Vel and Tash", [(None, None)], [], retrieved=False),
        {"id": "k1", "kind": "knowledge", "probe": "plain", "answers": ["x"], "answer": "x"},  # not long-form
    ]
    figures = synthetic.long_form_figures(rows)
    assert figures == {
        "retrieval_rate_long_form": 0.75,  # L1 L2 L3 of the 4 rows with a decision (L4 has none)
        "long_form_accuracy": 0.4,  # both values: L1 L5 of 5 (the error row counts as wrong)
        "long_form_two_segments": 0.2,  # L1
        "long_form_depth_two": 0.4,  # L1, and L2 whose second segment was dropped
        "long_form_citations_valid": 0.75,  # of the 4 rows with segments, L3 numbers its first citation 2
        "long_form_gold_cited": 0.6667,  # of the retrieving rows L1 L2 L3, p1 is in L1's and L3's docs
        "long_form_error_rows": 1,
    }
    assert synthetic.long_form_figures(None) == dict.fromkeys(figures)
    # a citation naming another passage than its segment's is invalid, and so is a doc never cited
    assert not synthetic.citations_valid(lf("x", [], "", [(1, "p2")], ["p1"]))
    assert not synthetic.citations_valid(lf("x", [], "", [(1, "p1")], ["p1", "p2"]))
    assert synthetic.citations_valid(lf("x", [], "", [(1, "p1"), (2, "p2"), (1, "p1")], ["p1", "p2"]))
