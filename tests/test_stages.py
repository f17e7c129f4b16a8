"""Stage logic (first pass, retrieve, critique with long-form trees) and stage contracts, on a
fake engine and a fake retriever: no Ray, no vLLM, milliseconds per test. Expected values are
worked out by hand in the comments (weights are the paper's: 1, 1, 0.5)."""

from __future__ import annotations

import asyncio

import pyarrow as pa
import pytest

from fakes import EOS, IDS, TOKENS, FakeEngine, FakeRetriever, continuation, decode, position
from pipeline.infra.config import load_config
from pipeline.selfrag import tokens as T
from pipeline.services.clients import FIRST_PASS, URGENT, ServiceUnavailable
from pipeline.stages.columns import PROMPT_IDS
from pipeline.stages.common import engine_batches_per_replica, engine_request_prompts, route_key, rows_per_route
from pipeline.stages.contract import Contract, ContractError, check_chain
from pipeline.stages.critique import Critique
from pipeline.stages.first_pass import FirstPass
from pipeline.stages.prepare import prepare_table
from pipeline.stages.retrieve import Retrieve

R, N = IDS[T.RETRIEVAL], IDS[T.NO_RETRIEVAL]
REL, IRR, FULL = IDS[T.RELEVANT], IDS[T.IRRELEVANT], IDS[T.FULLY_SUPPORTED]
U5 = IDS[T.UTILITY[4]]


def cfg(*overrides):
    return load_config([], list(overrides))


SHARD = "s3://b/in/part-0.parquet"  # the shard of ``prepared`` rows
ONE_KEY = route_key(SHARD, 0, rows_per_route(cfg()))  # one engine replica: one routing key


def test_stage_actors_hold_requests_beyond_a_few_batches_per_replica_unless_the_service_autoscales():
    assert engine_batches_per_replica(cfg()) == 4
    assert engine_batches_per_replica(cfg("engine.batches_in_flight_per_replica=2")) == 2
    assert engine_batches_per_replica(cfg("engine.batches_in_flight_per_replica=null")) is None
    assert engine_batches_per_replica(cfg("engine.service.min_replicas=1", "engine.service.max_replicas=3")) is None


def test_a_batch_of_consecutive_rows_shares_a_routing_key_and_a_single_deployed_replica_has_one():
    assert rows_per_route(cfg()) is None and ONE_KEY == route_key("other", 99, None) == "all"
    assert rows_per_route(cfg("engine.service.replicas=2")) == 32  # the chain's batch
    assert rows_per_route(cfg("engine.service.replicas=2", "stages.chain=null", "stages.first_pass.batch_size=8")) == 8
    assert rows_per_route(cfg("engine.service.min_replicas=1", "engine.service.max_replicas=3")) == 32
    assert rows_per_route(cfg("engine.service.deployment=running")) == 32  # a reused service may have more replicas
    keys = [route_key(SHARD, offset, 32) for offset in (0, 31, 32, 63, 64)]
    assert keys[0] == keys[1] != keys[2] == keys[3] != keys[4] != keys[0]
    assert route_key("s3://b/in/part-1.parquet", 0, 32) != keys[0]
    # requests of at most one replica's batch where there is more than one replica to balance
    assert engine_request_prompts(cfg()) is None
    assert engine_request_prompts(cfg("engine.service.replicas=2", "engine.simulated.recording=/r")) == 16


def prepared(rows: list[dict], config) -> pa.Table:
    """Rows as the prepare stage leaves them (prompts tokenized by the fake tokenizer)."""
    table = pa.Table.from_pylist(rows)
    return prepare_table(table, "s3://b/in/part-0.parquet", config.input, "m", "r", tokens=TOKENS)


def run(logic, table: pa.Table) -> tuple[pa.Table, dict]:
    view = logic.contract(logic.cfg).view(table)
    stats = asyncio.run(logic.process(view))
    return view.result(), stats


def decision(p_retrieval: float):
    """A first-position continuation with P[Retrieval] = p, P[No Retrieval] = 1 - p."""
    return continuation(position(R if p_retrieval > 0.5 else N, {R: p_retrieval, N: 1 - p_retrieval}))


# --- first pass -------------------------------------------------------------------------------

def test_first_pass_decides_from_probabilities_and_answers_without_evidence():
    # two replicas, a routing key per row (groups of one row)
    config = cfg("selfrag.threshold=0.2", "engine.service.replicas=2", "stages.chain.batch_size=1")
    table = prepared([{"id": "a", "instruction": "Who founded Velmora?"}, {"id": "b", "instruction": "Say hi."},
                      {"id": "c", "instruction": None}], config)

    def script(prompt, budget):
        if prompt.endswith("[No Retrieval]"):
            return continuation(N, 11, position(U5), EOS)  # " w11[Utility:5]</s>"
        return decision(0.9 if "Velmora" in prompt else 0.1)

    engine = FakeEngine(script)
    out, _ = run(FirstPass(config, TOKENS, IDS, decode, engine), table)
    rows = out.to_pylist()
    # a: 0.9 > 0.2 retrieves, no answer yet; b: 0.1 answers from prompt + [No Retrieval]
    assert [r["retrieval_prob"] for r in rows[:2]] == pytest.approx([0.9, 0.1])
    assert [r["retrieved"] for r in rows] == [True, False, None]
    assert rows[0]["answer"] is None and rows[1]["answer"] == "w11" and rows[1]["candidates"] == []
    assert rows[2]["error"] == "question is null" and rows[2]["answer"] is None
    # one decision request per valid row, one answer request for b; every request carries its
    # row's routing key (rows of one key share a call: one decision call and one answer call per key)
    requests = [(route, text, budget) for route, texts, budgets, _ in engine.calls for text, budget in zip(texts, budgets)]
    assert sorted((route, budget) for route, _, budget in requests) == sorted(
        [(route_key(SHARD, 0, 1), 1), (route_key(SHARD, 1, 1), 1), (route_key(SHARD, 1, 1), 100)])
    assert len(engine.calls) == 3  # a decision call per key, an answer call for b's; none without requests
    assert engine.priorities == [FIRST_PASS] * 3  # ahead of critiques: they let their rows' retrieval start
    # groups of two rows: a and b share a key, so one decision call holds both
    engine = FakeEngine(script)
    run(FirstPass(cfg("selfrag.threshold=0.2", "engine.service.replicas=2", "stages.chain.batch_size=2"), TOKENS, IDS,
                  decode, engine), table)
    assert [(route, budgets) for route, _, budgets, _ in engine.calls] == [
        (route_key(SHARD, 0, 2), [1, 1]), (route_key(SHARD, 1, 2), [100])]


def test_first_pass_engine_errors_and_too_long_prompts_are_row_errors():
    config = cfg("engine.max_model_len=160")
    table = prepared([{"id": "a", "instruction": "Short?"}, {"id": "b", "instruction": "x" * 200},
                      {"id": "c", "instruction": "Fails?"}], config)
    engine = FakeEngine(lambda prompt, budget: "ValueError: boom" if "Fails" in prompt else decision(0.9))
    rows = run(FirstPass(config, TOKENS, IDS, decode, engine), table)[0].to_pylist()
    assert rows[0]["error"] is None and rows[0]["retrieved"] is True
    # a: BOS + 39 characters + [No Retrieval] = 41 tokens, + 100 fits in 160;
    # b: BOS + 233 characters ("### Instruction:\n", 200 x, "\n\n### Response:\n") + [No Retrieval] = 235
    assert rows[1]["error"] == "prompt is 235 tokens; with 100 new tokens it exceeds max_model_len=160"
    assert rows[2]["error"] == "engine error: ValueError: boom" and rows[2]["retrieved"] is None
    assert {route for route, *_ in engine.calls} == {ONE_KEY}


def test_never_mode_answers_every_row_without_a_decision():
    config = cfg("selfrag.mode=never")
    table = prepared([{"id": "a", "instruction": "Who?"}], config)
    engine = FakeEngine(lambda prompt, budget: continuation(12, EOS))
    rows = run(FirstPass(config, TOKENS, IDS, decode, engine), table)[0].to_pylist()
    assert rows[0]["retrieved"] is False and rows[0]["retrieval_prob"] is None and rows[0]["answer"] == "w12"
    assert [texts[0].endswith("[No Retrieval]") for _, texts, _, _ in engine.calls] == [True]


def test_a_service_gone_for_good_fails_the_batch_instead_of_each_row():
    class Gone:
        async def generate(self, *args, **kwargs):
            raise ServiceUnavailable("the engine service failed 6 times")

    config = cfg()
    table = prepared([{"id": "a", "instruction": "Who?"}], config)
    with pytest.raises(ServiceUnavailable):
        run(FirstPass(config, TOKENS, IDS, decode, Gone()), table)


# --- retrieve ---------------------------------------------------------------------------------

def passage(pid, text="text"):
    return {"id": pid, "title": pid.upper(), "text": text}


def test_retrieve_uses_ctxs_or_one_search_per_batch():
    config = cfg("selfrag.top_k=2")
    table = prepared([{"id": "a", "instruction": "Q1", "ctxs": None},
                      {"id": "b", "instruction": "Q2", "ctxs": [None, passage("x", ""), passage("y"), passage("z")]},
                      {"id": "c", "instruction": "Q3", "ctxs": [None]},
                      {"id": "d", "instruction": "Q4", "ctxs": None}], config)
    table = table.set_column(table.schema.get_field_index("retrieved"), "retrieved",
                             pa.array([True, True, True, False]))
    retriever = FakeRetriever(lambda q: [passage(f"{q}-1"), passage(f"{q}-2"), passage(f"{q}-3")])
    rows = run(Retrieve(config, TOKENS, IDS, decode, retriever=retriever), table)[0].to_pylist()
    assert retriever.calls == [["Q1"]]  # d does not retrieve; b and c bring ctxs
    assert [p["id"] for p in rows[0]["passages"]] == ["Q1-1", "Q1-2"]
    assert [p["id"] for p in rows[1]["passages"]] == ["y", "z"] and rows[1]["ctxs_dropped"] == 2
    assert rows[2]["error"] == "ctxs has no usable passage (1 dropped: null, or null/empty text)"
    assert rows[3]["passages"] is None and rows[3]["error"] is None


# --- critique ---------------------------------------------------------------------------------

def retrieved_rows(config, rows: list[dict], passages: list[list[dict]]) -> pa.Table:
    table = prepared(rows, config)
    table = table.set_column(table.schema.get_field_index("retrieved"), "retrieved", pa.array([True] * len(rows)))
    typ = table.schema.field("passages").type
    return table.set_column(table.schema.get_field_index("passages"), "passages",
                            pa.array([[dict(p, retrieval_score=None) for p in ps] for ps in passages], typ))


def test_critique_scores_every_passage_and_selects_the_best():
    config = cfg("selfrag.top_k=2")
    table = retrieved_rows(config, [{"id": "a", "instruction": "Q?"}], [[passage("p1", "one"), passage("p2", "two")]])

    def script(prompt, budget):
        # p1: s_rel 0.6, s_sup 1, s_use 1 -> 0.6 + 1 + 0.5 = 2.1; p2: s_rel 0.9 -> 2.4
        p = 0.6 if "one" in prompt else 0.9
        return continuation(position(REL, {REL: p, IRR: 1 - p}), 13 if p < 0.9 else 14,
                            position(FULL, {FULL: 1.0}), position(U5, {U5: 1.0}), EOS)

    engine = FakeEngine(script)
    rows = run(Critique(config, TOKENS, IDS, decode, engine), table)[0].to_pylist()
    cands = rows[0]["candidates"]
    assert [c["final"] for c in cands] == pytest.approx([2.1, 2.4])
    assert rows[0]["answer"] == "w14" and rows[0]["best_passage_id"] == "p2"
    # one engine call for the row's two candidates, with its routing key, prompts ending in the evidence
    ((route, texts, budgets, _),) = engine.calls
    assert route == ONE_KEY and budgets == [100, 100] and engine.priorities == [0]  # short-form: not URGENT
    assert texts[1].endswith("[Retrieval]<paragraph>P2\ntwo</paragraph>")


def test_closed_set_answers_sum_their_scores():
    config = cfg("selfrag.top_k=3")
    table = retrieved_rows(config, [{"id": "a", "instruction": "Claim.", "task": "fever"}],
                           [[passage("p1", "one"), passage("p2", "two"), passage("p3", "three")]])
    # answers w20 (1.0), w21 (0.8), w21 (0.8): w21 sums to 1.6 and wins although w20 is best alone
    finals = {"one": (20, 1.0), "two": (21, 0.8), "three": (21, 0.8)}

    def script(prompt, budget):
        word, p = next(v for k, v in finals.items() if f"\n{k}</paragraph>" in prompt)
        return continuation(position(REL, {REL: p, IRR: 1 - p}), word, EOS)

    rows = run(Critique(config, TOKENS, IDS, decode, FakeEngine(script)), table)[0].to_pylist()
    assert rows[0]["answer"] == "w21" and rows[0]["best_passage_id"] == "p2"


def test_long_form_rows_are_decoded_as_trees_with_fresh_searches():
    config = cfg("selfrag.top_k=1", "selfrag.long_form.beam_width=1", "selfrag.long_form.max_depth=3")
    table = retrieved_rows(config, [{"id": "a", "instruction": "Tell me about Ada.", "task": "asqa"}],
                           [[passage("p1", "one")]])
    retriever = FakeRetriever(lambda q: [passage("p2", "two")])

    def script(prompt, budget):
        if prompt.endswith("\ntwo</paragraph>"):  # depth 2: ends the answer
            return continuation(position(REL, {REL: 1.0}), 15, position(FULL, {FULL: 1.0}), position(U5), EOS)
        return continuation(position(REL, {REL: 1.0}), 14, position(FULL, {FULL: 1.0}), R)  # asks again

    engine = FakeEngine(script)
    out, stats = run(Critique(config, TOKENS, IDS, decode, engine, retriever), table)
    row = out.to_pylist()[0]
    assert row["answer"] == "w14 [1] w15 [2]" and [d["id"] for d in row["docs"]] == ["p1", "p2"]
    assert row["candidates"] is None and row["path_depth"] == 2
    # depth 2 searched with question + segment 1, and its prompt carries segment 1's ids as generated
    assert retriever.calls == [[f"{row['instruction']} w14"]]
    assert [len(texts) for _, texts, _, _ in engine.calls] == [1, 1]
    assert all(stop == [R] for *_, stop in engine.calls)
    assert "[Relevant] w14[Fully supported][Retrieval]<paragraph>P2\ntwo</paragraph>" in engine.calls[1][1][0]
    assert stats["long_form_depths"] == 2 and stats["long_form_searches"] == 1 and stats["long_form_rows"] == 1


def test_a_batchs_trees_search_and_generate_together_one_call_per_depth():
    config = cfg("selfrag.top_k=1", "selfrag.long_form.beam_width=1", "selfrag.long_form.max_depth=3")
    rows = [{"id": i, "instruction": f"Tell me about {i}.", "task": "asqa"} for i in ("ada", "bob", "cy")]
    table = retrieved_rows(config, rows, [[passage("p1", "one")]] * 3)
    retriever = FakeRetriever(lambda q: [passage("p2", "two")])

    def script(prompt, budget):  # as above: depth 1 asks to retrieve again, depth 2 ends
        if prompt.endswith("\ntwo</paragraph>"):
            return continuation(position(REL, {REL: 1.0}), 15, position(FULL, {FULL: 1.0}), position(U5), EOS)
        return continuation(position(REL, {REL: 1.0}), 14, position(FULL, {FULL: 1.0}), R)

    engine = FakeEngine(script)
    out, stats = run(Critique(config, TOKENS, IDS, decode, engine, retriever), table)
    assert [r["answer"] for r in out.to_pylist()] == ["w14 [1] w15 [2]"] * 3
    assert [len(texts) for _, texts, _, _ in engine.calls] == [3, 3]  # one call per depth, not one per tree
    assert engine.priorities == [URGENT, URGENT]  # the engine schedules trees' requests first
    assert retriever.calls == [[f"Tell me about {i}. w14" for i in ("ada", "bob", "cy")]]
    # the trees' own counters are per tree, as before
    assert stats["long_form_depths"] == 6 and stats["long_form_searches"] == 3 and stats["long_form_rows"] == 3


def test_rows_of_one_batch_are_in_flight_together():
    """Every row's requests (short-form groups and long-form trees) are sent before any answer
    comes back: continuous batching needs them in flight at once."""
    config = cfg("selfrag.top_k=1", "selfrag.long_form.max_depth=2")
    ids = [f"r{n}" for n in range(12)]
    started, release = [], asyncio.Event()

    class Gate:
        async def generate(self, prompts, max_tokens, route, stop_ids=(), priority=0):
            started.extend(prompts)
            if len(started) == len(ids):
                release.set()
            await asyncio.wait_for(release.wait(), timeout=5)
            return [continuation(position(REL, {REL: 1.0}), 10, EOS) for _ in prompts]

    rows = [{"id": i, "instruction": "Q", "task": "asqa" if n % 3 == 0 else None} for n, i in enumerate(ids)]
    table = retrieved_rows(config, rows, [[passage("p")]] * len(ids))
    out = run(Critique(config, TOKENS, IDS, decode, Gate(), FakeRetriever(lambda q: [])), table)[0].to_pylist()
    assert len(started) == len(ids) and all(r["answer"].startswith("w10") for r in out)


# --- contracts --------------------------------------------------------------------------------

def test_reading_an_undeclared_or_missing_column_is_an_error():
    contract = Contract("s", reads={"a": pa.int64()}, writes={"b": pa.string()}, optional=frozenset({"c"}))
    contract = Contract("s", reads={"a": pa.int64(), "c": None}, writes={"b": pa.string()}, optional=frozenset({"c"}))
    view = contract.view(pa.table({"a": [1], "x": [2]}))
    assert view["a"] == [1] and view["c"] == [None]  # declared optional input column, absent: nulls
    with pytest.raises(ContractError, match="reads column 'x', which its contract does not declare"):
        view["x"]
    with pytest.raises(ContractError, match="writes column 'a'"):
        view.set(a=[2])
    view.set(b=["y"])
    assert view.result().column("b").type == pa.string()
    with pytest.raises(ContractError, match="reads column 'a', which the batch lacks"):
        contract.view(pa.table({"x": [1]}))["a"]


def test_the_dataflow_chain_is_checked_when_built():
    from pipeline.run.dataflow import stage_contracts

    schema = pa.schema([("id", pa.string()), ("instruction", pa.string())])
    for mode in ("adaptive", "always", "never"):
        final = check_chain({f.name: f.type for f in schema}, stage_contracts(cfg(f"selfrag.mode={mode}"), schema))
        assert "answer" in final and PROMPT_IDS in final
    misspelt = cfg("input.question_column=instruction")
    misspelt.input.ctxs_column = "ctxs"
    broken = stage_contracts(misspelt, schema)
    broken.insert(1, Contract("typo", reads={"retreived": pa.bool_()}))
    with pytest.raises(ContractError, match="stage 'typo' reads column 'retreived', which no earlier stage writes"):
        check_chain({f.name: f.type for f in schema}, broken)
    wrong_type = [Contract("src", reads={}, writes={"n": pa.int64()}), Contract("use", reads={"n": pa.string()})]
    with pytest.raises(ContractError, match="reads column 'n' as string, but it is int64"):
        check_chain({}, wrong_type)


def test_non_empty_reads_list_lengths_and_keeps_the_contract():
    ctxs = pa.list_(pa.struct([("text", pa.string())]))
    table = pa.table({"ctxs": pa.array([[{"text": "a"}], [], None, [{"text": None}]], type=ctxs),
                      "note": ["x", "", None, "y"]})
    view = Contract("s", reads={"ctxs": None, "note": None, "absent": None}, optional=frozenset({"absent"})).view(table)
    assert view.non_empty("ctxs") == [True, False, False, True]  # a passage with null text is still an item
    assert view.non_empty("note") == [True, False, False, True]  # not a list: Python truthiness
    assert view.non_empty("absent") == [False] * 4  # an optional column the input lacks
    with pytest.raises(ContractError, match="does not declare"):
        Contract("s", reads={"note": None}).view(table).non_empty("ctxs")
