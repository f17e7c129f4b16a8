"""Unit tests of the service plumbing, without Ray or an engine running: row affinity
(``pipeline.services.routing``), the engine replica's mapping of failures
(``EngineReplica.generate``), the clients' retries (``pipeline.services.clients``) and vLLM
completions as plain records (``pipeline.model.vllm_engine.to_continuation``)."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from types import SimpleNamespace

import pytest

from pipeline.infra.config import ServiceConfig
from pipeline.model.vllm_engine import PromptTooLong, to_continuation
from pipeline.selfrag.scoring import Continuation
from pipeline.services import clients
from pipeline.services.clients import (FIRST_PASS, ROUTE, URGENT, InFlightWindow, ServiceUnavailable, call_with_retries,
                                      retryable)
from pipeline.services.coalescing import CoalescingSearch
from pipeline.stages.same_turn import SameTurnBatcher, TurnBatchedEngine, TurnBatchedRetriever
from pipeline.runtime.metrics_actor import Reporter
from pipeline.services.engine import EngineReplica, EngineUnavailable
from pipeline.services.routing import RowAffinityRouter, rendezvous_order, request_route

REPLICAS = [f"replica-{i}" for i in range(5)]
KEYS = [f"row-{i}" for i in range(1000)]


# --- routing -------------------------------------------------------------------------------


def test_rendezvous_order_is_highest_hash_first():
    # the documented rule, computed here on its own: blake2b-64 of "key\0replica", big-endian, highest first
    def score(replica):
        return int.from_bytes(hashlib.blake2b(f"row-1\0{replica}".encode(), digest_size=8).digest(), "big")

    assert rendezvous_order("row-1", ["a", "b", "c"]) == sorted(["a", "b", "c"], key=score, reverse=True)
    assert rendezvous_order("row-1", ["a", "b", "c"]) == ["b", "c", "a"]  # pinned: a change of hash shows here


def test_rendezvous_order_is_stable_and_keeps_every_id():
    for key in KEYS[:50]:
        order = rendezvous_order(key, REPLICAS)
        assert sorted(order) == sorted(REPLICAS)  # a permutation: every id once
        assert rendezvous_order(key, REPLICAS) == order  # the same again
        assert rendezvous_order(key, list(reversed(REPLICAS))) == order  # whatever the order given
    assert rendezvous_order("row-1", []) == []
    assert rendezvous_order("row-1", ["only"]) == ["only"]


def test_every_replica_is_home_to_a_fair_share_of_keys():
    homes = Counter(rendezvous_order(k, REPLICAS)[0] for k in KEYS)
    assert set(homes) == set(REPLICAS)
    assert all(150 <= n <= 250 for n in homes.values()), homes  # 200 each on average


def test_removing_a_replica_moves_only_its_own_keys():
    gone = "replica-2"
    left = [r for r in REPLICAS if r != gone]
    moved = 0
    for key in KEYS:
        before, after = rendezvous_order(key, REPLICAS), rendezvous_order(key, left)
        assert after == [r for r in before if r != gone]  # the others keep their relative order
        if before[0] == gone:
            moved += 1
            assert after[0] == before[1]  # the removed replica's keys go to their second choice
        else:
            assert after[0] == before[0]  # every other key stays home
    assert moved == sum(rendezvous_order(k, REPLICAS)[0] == gone for k in KEYS) > 0


def test_adding_a_replica_moves_keys_only_to_it():
    grown = REPLICAS + ["replica-5"]
    for key in KEYS:
        before, after = rendezvous_order(key, REPLICAS)[0], rendezvous_order(key, grown)[0]
        assert after in (before, "replica-5")


def request(*args):
    """What ``request_route`` reads of a Serve ``PendingRequest``: its positional arguments."""
    return SimpleNamespace(args=list(args), kwargs={})


def test_request_route():
    assert request_route(request({ROUTE: "q7", "prompts": [[1]]})) == "q7"
    assert request_route(request({ROUTE: 7})) == "7"  # a key is text
    assert request_route(request({ROUTE: 0})) == "0"  # a falsy id is still a key
    assert request_route(None) is None
    assert request_route(request()) is None  # no arguments
    assert request_route(request({"prompts": [[1]]})) is None  # a dict without a route
    assert request_route(request({ROUTE: None})) is None
    assert request_route(request(["q7"])) is None  # not a dict
    assert request_route(request("q7", {ROUTE: "q8"})) is None  # only the first argument counts


def replica(unique_id):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id))


@pytest.fixture(autouse=True)
def routed_replicas(monkeypatch):
    """The replica counts routers record, for this test only."""
    monkeypatch.setattr(clients, "ROUTED_REPLICAS", {})


def bare_router() -> RowAffinityRouter:
    """A router as Serve makes it for the engine application, without Serve."""
    from ray.serve._private.common import DeploymentID

    router = object.__new__(RowAffinityRouter)
    router._deployment_id = DeploymentID(name="SelfRagEngine", app_name="test-engine")
    return router


def test_router_sends_a_row_home_first_and_the_rest_as_fallback():
    router = bare_router()
    candidates = [replica(r) for r in REPLICAS]
    choose = router.choose_replicas
    ranked = asyncio.run(choose(candidates, request({ROUTE: "row-1"})))
    order = rendezvous_order("row-1", REPLICAS)
    assert [[r.replica_id.unique_id for r in group] for group in ranked] == [order[:1], order[1:]]
    assert asyncio.run(choose(candidates, request({"prompts": []}))) == [candidates]  # no key: any replica
    assert asyncio.run(choose(candidates[:1], request({ROUTE: "row-1"}))) == [candidates[:1]]
    assert asyncio.run(choose([], request({ROUTE: "row-1"}))) == []


# --- the engine replica's error mapping ----------------------------------------------------


def continuation(prompt, budget):
    return Continuation(token_ids=[*prompt, budget], logprobs=[{}], cumulative_logprob=-1.0, text=f"p{prompt[0]}")


def bare_replica(outcomes, errored=False):
    """An ``EngineReplica`` without vLLM: ``_one`` returns (or raises) ``outcomes[prompt[0]]``,
    a callable of (prompt, budget) or an exception; calls are recorded in ``.calls``."""
    engine = SimpleNamespace(errored=errored, shutdown=lambda: None)
    r = object.__new__(EngineReplica)
    r.engine, r.calls, r.priorities = engine, [], []
    r.count_into({})
    r._recorder = None  # not recording
    r.reporter = Reporter("engine")  # outside Ray: reports go nowhere

    async def one(prompt_ids, max_tokens, stop_ids, priority=0):
        r.calls.append((list(prompt_ids), max_tokens, tuple(stop_ids)))
        r.priorities.append(priority)
        outcome = outcomes[prompt_ids[0]]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome(prompt_ids, max_tokens)

    r._one = one
    return r


def generate(r, prompts, budgets, stop_ids=(2,), **more):
    return asyncio.run(r.generate({ROUTE: "row-1", "prompts": prompts, "max_tokens": budgets, "stop_ids": stop_ids,
                                   **more}))


def test_a_refused_prompt_is_an_error_string_in_its_slot_only():
    r = bare_replica({1: continuation, 2: ValueError("prompt rejected"), 3: continuation,
                      4: PromptTooLong("prompt is 9 tokens")})
    out = generate(r, [[1], [2], [3], [4]], [4, 5, 6, 7])
    assert out == [Continuation([1, 4], [{}], -1.0, "p1"), "ValueError: prompt rejected",
                   Continuation([3, 6], [{}], -1.0, "p3"), "PromptTooLong: prompt is 9 tokens"]
    assert r.calls == [([1], 4, (2,)), ([2], 5, (2,)), ([3], 6, (2,)), ([4], 7, (2,))]
    assert r.window["first_start"] <= r.window["last_end"]
    generate(r, [[1], [3]], [4, 6], priority=URGENT)  # a long-form tree's: vLLM schedules it first
    assert r.priorities == [0, 0, 0, 0, URGENT, URGENT]


def test_a_dead_engine_core_in_any_slot_fails_the_whole_call():
    from vllm.v1.engine.exceptions import EngineDeadError

    for dead in (1, 3):
        outcomes = {1: continuation, 2: ValueError("prompt rejected"), 3: continuation}
        outcomes[dead] = EngineDeadError()
        with pytest.raises(EngineUnavailable, match="died"):
            generate(bare_replica(outcomes), [[1], [2], [3]], [4, 5, 6])


def test_an_engine_that_errored_during_the_call_fails_it_instead_of_its_rows():
    outcomes = {1: continuation}
    r = bare_replica(outcomes)

    def die(prompt, budget):  # the engine core dies under this request: vLLM's loop marks it errored
        r.engine.errored = True
        raise RuntimeError("background loop stopped")

    outcomes[2] = die
    with pytest.raises(EngineUnavailable, match="died"):
        generate(r, [[1], [2]], [4, 5])


def test_an_errored_engine_refuses_before_any_request():
    r = bare_replica({1: continuation}, errored=True)
    with pytest.raises(EngineUnavailable, match="is dead"):
        generate(r, [[1]], [4])
    assert r.calls == [] and r.window == {}


def test_health_check_fails_once_the_engine_errored():
    r = bare_replica({})
    assert asyncio.run(r.check_health()) is None
    r.engine.errored = True
    with pytest.raises(EngineUnavailable):
        asyncio.run(r.check_health())


# --- the clients' retries ------------------------------------------------------------------


def test_retryable():
    from ray.exceptions import ActorDiedError, RayActorError
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    assert retryable(EngineUnavailable("dead"))
    assert retryable(RayActorError())
    assert retryable(ActorDiedError())  # a subclass: an actor that died with its node
    assert retryable(BackPressureError(num_queued_requests=3, max_queued_requests=2))
    assert retryable(DeploymentUnavailableError(DeploymentID(name="engine", app_name="selfrag")))
    assert retryable(ReplicaUnavailableError("replica-1"))
    assert retryable(asyncio.TimeoutError()) and retryable(TimeoutError())
    for exc in (ValueError("bad"), RuntimeError("bug"), PromptTooLong("long"), ServiceUnavailable("gone"),
                KeyError("prompts")):
        assert not retryable(exc), exc


SVC = ServiceConfig(request_retries=2, retry_backoff_s=0)


def script(*outcomes):
    """An async call that raises or returns ``outcomes`` in turn; ``.calls`` counts its calls."""
    calls = []

    async def call():
        outcome = outcomes[len(calls)]
        calls.append(1)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    call.calls = calls
    return call


def test_a_call_is_retried_until_it_succeeds():
    call = script(EngineUnavailable("dead"), TimeoutError("slow"), ["ok"])
    assert asyncio.run(call_with_retries(call, "engine", SVC)) == ["ok"]
    assert len(call.calls) == 3  # request_retries=2: the last allowed try


def test_retries_end_with_service_unavailable():
    call = script(EngineUnavailable("dead 1"), EngineUnavailable("dead 2"), EngineUnavailable("dead 3"), ["late"])
    with pytest.raises(ServiceUnavailable) as caught:
        asyncio.run(call_with_retries(call, "engine", SVC))
    assert len(call.calls) == 3  # one try and two retries, never a fourth
    assert str(caught.value) == ("the engine service failed 3 times on unavailable replicas "
                                 "(last: EngineUnavailable: dead 3); rerun the job to resume")


def test_a_non_retryable_error_propagates_at_once():
    error = ValueError("prompt rejected")
    call = script(error, ["never"])
    with pytest.raises(ValueError) as caught:
        asyncio.run(call_with_retries(call, "engine", SVC))
    assert caught.value is error and len(call.calls) == 1
    call = script(EngineUnavailable("dead"), KeyError("prompts"), ["never"])  # also after a retry
    with pytest.raises(KeyError):
        asyncio.run(call_with_retries(call, "retriever", SVC))
    assert len(call.calls) == 2


def test_an_error_without_a_message_is_retried_too():
    """asyncio.wait_for's TimeoutError has an empty message: the retry's log line once failed on it."""
    call = script(TimeoutError(), ["ok"])
    assert asyncio.run(call_with_retries(call, "engine", SVC)) == ["ok"]
    assert len(call.calls) == 2


def test_a_try_past_its_timeout_is_retried():
    calls = []

    def never_answers():  # a future no one completes: only the per-try timeout ends the wait
        calls.append(1)
        return asyncio.get_running_loop().create_future()

    svc = ServiceConfig(request_retries=1, retry_backoff_s=0, request_timeout_s=0)
    with pytest.raises(ServiceUnavailable, match="failed 2 times .*TimeoutError"):
        asyncio.run(call_with_retries(never_answers, "retriever", svc))
    assert len(calls) == 2


def test_backoff_doubles_up_to_30_seconds(monkeypatch):
    waits = []

    async def no_wait(seconds):
        waits.append(seconds)

    monkeypatch.setattr(clients.asyncio, "sleep", no_wait)
    call = script(*[EngineUnavailable("dead")] * 8)
    with pytest.raises(ServiceUnavailable):
        asyncio.run(call_with_retries(call, "engine", ServiceConfig(request_retries=7, retry_backoff_s=1.0)))
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]  # none after the last try
    assert len(call.calls) == 8


# --- vLLM completions as plain records -----------------------------------------------------


def lp(value):
    return SimpleNamespace(logprob=value)


def completion(**changes):
    fields = dict(token_ids=(5, 7, 9), text="raw text", cumulative_logprob=-0.61,
                  logprobs=[{5: lp(-0.1), 100: lp(-2.0)}, {7: lp(-0.5)}, {101: lp(-3.0), 9: lp(-0.01)}])
    return SimpleNamespace(**{**fields, **changes})


def test_to_continuation_keeps_only_the_asked_ids():
    out = to_continuation(completion(), frozenset({100, 101}))
    assert out == Continuation(token_ids=[5, 7, 9], logprobs=[{100: -2.0}, {}, {101: -3.0}],
                               cumulative_logprob=-0.61, text="raw text")
    assert isinstance(out.token_ids, list)


def test_to_continuation_keeps_every_id_without_keep():
    out = to_continuation(completion(), None)
    assert out.logprobs == [{5: -0.1, 100: -2.0}, {7: -0.5}, {101: -3.0, 9: -0.01}]


def test_to_continuation_decodes_the_ids_when_given_a_decoder():
    seen = []

    def decode(ids):
        seen.append(ids)
        return "-".join(map(str, ids))

    assert to_continuation(completion(text=None), None, decode).text == "5-7-9"
    assert seen == [[5, 7, 9]]


def test_to_continuation_of_missing_values():
    out = to_continuation(completion(cumulative_logprob=None, logprobs=None), frozenset({100}))
    assert out.cumulative_logprob == 0.0 and isinstance(out.cumulative_logprob, float)
    assert out.logprobs == []
    assert to_continuation(completion(token_ids=(), logprobs=[], text=""), None) == Continuation([], [], -0.61, "")


# --- balance: a row leaves a far busier home --------------------------------------------------


def test_a_row_stays_home_unless_home_holds_more_than_the_slack_beyond_the_least_loaded():
    from pipeline.services.routing import DEFAULT_SLACK, spill_to

    order = ["a", "b", "c"]
    assert spill_to(order, {}) == "a"  # nothing in flight: home
    assert spill_to(order, {"a": DEFAULT_SLACK, "b": 0}) == "a"  # not more than the slack
    assert spill_to(order, {"a": DEFAULT_SLACK + 1, "b": 5, "c": 0}) == "c"  # the least loaded
    assert spill_to(order, {"a": DEFAULT_SLACK + 1, "b": 0, "c": 0}) == "b"  # ties: the row's own order
    # a slack of one replica's batch (16 sequences): also deep queues stay within it of each other
    assert spill_to(order, {"a": 416, "b": 400, "c": 400}, slack=16) == "a"
    assert spill_to(order, {"a": 417, "b": 400, "c": 401}, slack=16) == "b"


def test_an_engine_call_beyond_one_replica_batch_goes_as_several_requests_answered_in_order():
    sent = []

    class Generate:
        @staticmethod
        def remote(request):
            sent.append(request)

            async def answer():
                return [f"out{prompt[0]}" for prompt in request["prompts"]]
            return answer()

    def client(max_prompts):
        c = object.__new__(clients.ServeEngineClient)  # as built on a Serve handle, here a scripted one
        c.handle, c.svc, c.metrics, c.max_prompts, c.calls = SimpleNamespace(generate=Generate), ServiceConfig(), "m", \
            max_prompts, 0
        c.window = InFlightWindow(None, lambda: None)
        return c

    split = client(2)
    outs = asyncio.run(split.generate([[1], [2], [3], [4], [5]], [10, 20, 30, 40, 50], "g1", [9]))
    assert outs == ["out1", "out2", "out3", "out4", "out5"] and split.calls == 3
    assert [(r["prompts"], r["max_tokens"]) for r in sent] == [([[1], [2]], [10, 20]), ([[3], [4]], [30, 40]),
                                                               ([[5]], [50])]
    assert all(r[ROUTE] == "g1" and r["stop_ids"] == [9] and r["priority"] == 0 for r in sent)
    sent.clear()
    whole = client(None)
    assert asyncio.run(whole.generate([[1], [2], [3]], [1, 1, 1], "all", priority=URGENT)) == ["out1", "out2", "out3"]
    assert len(sent) == 1 and whole.calls == 1 and sent[0]["priority"] == URGENT


def test_a_failed_part_of_a_split_engine_call_stops_the_others_and_a_short_answer_fails():
    stopped = []

    class Generate:
        @staticmethod
        def remote(request):
            async def answer():
                first = request["prompts"][0][0]
                if first == 3:
                    raise ValueError("boom")
                if first == 5:
                    return []  # an answer short of its prompts
                try:
                    await asyncio.Event().wait()  # a long generation
                except asyncio.CancelledError:
                    stopped.append(first)
                    raise
            return answer()

    client = object.__new__(clients.ServeEngineClient)
    client.handle, client.svc, client.metrics, client.max_prompts, client.calls = SimpleNamespace(generate=Generate), \
        ServiceConfig(), "m", 2, 0
    client.window = InFlightWindow(8, lambda: 1)
    with pytest.raises(ValueError, match="boom"):
        asyncio.run(client.generate([[1], [2], [3], [4]], [1] * 4, "g"))
    assert stopped == [1]  # the first part, still running, was stopped
    with pytest.raises(RuntimeError, match="answered 0 of 1 prompts"):
        asyncio.run(client.generate([[5]], [1], "g"))
    assert client.window.in_flight == 0  # failed, stopped and short parts all gave their room back


def test_the_in_flight_window_holds_requests_beyond_its_limit_and_lets_them_go_by_priority_then_arrival():
    replicas = {"n": None}
    window = InFlightWindow(4, lambda: replicas["n"])

    async def scenario():
        assert window.limit() == float("inf")  # replicas not known yet: no limit
        replicas["n"] = 2  # 8 prompts in flight at most
        await window.admit(6)
        await window.admit(2)
        order = []

        async def request(name, prompts, priority=0):
            await window.admit(prompts, priority)
            order.append(name)

        tasks = [asyncio.ensure_future(request(name, n, p))
                 for name, n, p in (("a", 3, 0), ("b", 2, 0), ("c", 2, FIRST_PASS), ("gone", 1, FIRST_PASS))]
        await asyncio.sleep(0)
        assert order == [] and window.in_flight == 8  # all wait: the window is full
        await window.admit(5, URGENT)  # a tree's request never waits, and counts
        assert window.in_flight == 13
        tasks[3].cancel()  # given up while it waited: skipped, never counted
        window.release(5)
        window.release(6)  # 2 in flight: c (first pass) goes first, then a; b waits for 3 more free
        await asyncio.sleep(0)
        assert order == ["c", "a"] and window.in_flight == 7
        window.release(2)
        await asyncio.sleep(0)
        assert order == ["c", "a", "b"] and window.in_flight == 7
        assert tasks[3].cancelled()
        window.release(2)
        window.release(3)
        window.release(2)
        assert window.in_flight == 0
        await window.admit(20)  # more than the limit goes when nothing is in flight
        assert window.in_flight == 20
        window.release(20)

    asyncio.run(scenario())
    assert InFlightWindow(None, lambda: 8).limit() == float("inf")  # no per-replica limit set


def test_a_request_admitted_as_its_call_is_cancelled_gives_its_room_back():
    window = InFlightWindow(2, lambda: 1)

    async def scenario():
        await window.admit(2)
        waiter = asyncio.ensure_future(window.admit(2))
        await asyncio.sleep(0)
        window.release(2)  # the waiter is admitted ...
        waiter.cancel()  # ... and cancelled before it ran
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert window.in_flight == 0

    asyncio.run(scenario())


def test_an_engine_client_waits_for_room_in_its_process_window_shared_by_its_applications_clients(monkeypatch):
    from ray import serve

    answers = []

    class Generate:
        @staticmethod
        def remote(request):
            async def answer():
                done = asyncio.get_running_loop().create_future()
                answers.append(done)
                await done
                return [[0]] * len(request["prompts"])
            return answer()

    monkeypatch.setattr(clients, "WINDOWS", {})
    monkeypatch.setattr(clients, "ROUTED_REPLICAS", {})
    monkeypatch.setattr(serve, "get_app_handle",
                        lambda name: SimpleNamespace(options=lambda: SimpleNamespace(generate=Generate)))

    def client():
        return clients.ServeEngineClient("shared-app", ServiceConfig(), max_prompts=2, batches_per_replica=1,
                                         replicas=1)

    first, second = client(), client()
    assert first.window is second.window and first.window.limit() == 2  # 1 replica assumed until routed
    clients.ROUTED_REPLICAS["shared-app"] = 2
    assert first.window.limit() == 4  # as the router saw

    async def scenario():
        calls = [asyncio.ensure_future(first.generate([[1], [2], [3], [4]], [1] * 4, "g")),
                 asyncio.ensure_future(second.generate([[5], [6]], [1, 1], "h"))]
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(answers) == 2 and first.window.in_flight == 4  # the second client's request waits
        answers[0].set_result(None)
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(answers) == 3
        for done in answers[1:]:
            done.set_result(None)
        assert [len(out) for out in await asyncio.gather(*calls)] == [4, 2]
        assert first.window.in_flight == 0

    asyncio.run(scenario())


def test_the_engine_deployment_gives_its_router_one_replica_batch_as_slack():
    from pipeline.infra.config import load_config
    from pipeline.services.deploy import engine_application, replica_batch
    from pipeline.services.routing import DEFAULT_SLACK

    assert replica_batch(load_config()) == 512  # the CPU default in engine.extra
    assert replica_batch(load_config([], ["engine.extra.max_num_seqs=null"])) == DEFAULT_SLACK  # vLLM's default
    simulated = load_config([], ["engine.simulated.recording=/rec", "engine.simulated.max_num_seqs=16"])
    assert replica_batch(simulated) == 16
    router = engine_application(simulated, None)._bound_deployment._deployment_config.request_router_config
    assert router.request_router_kwargs == {"slack": 16}  # Serve passes them to initialize_state


def test_the_router_records_how_many_replicas_serve_tells_it_of_for_the_stages_window():
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

    deployment = DeploymentID(name="SelfRagEngine", app_name="test-engine")

    async def queue_len(deadline_s):
        return 0

    async def scenario():
        router = RowAffinityRouter(deployment_id=deployment, handle_source=DeploymentHandleSource.UNKNOWN)
        running = [SimpleNamespace(replica_id=ReplicaID(unique_id=f"r{i}", deployment_id=deployment),
                                   max_ongoing_requests=8, get_queue_len=queue_len) for i in range(3)]
        router.update_replicas(running)  # as the handle's long poll does when the actor starts
        assert clients.ROUTED_REPLICAS == {"test-engine": 3}
        router.update_replicas(running[:1])  # one replica gone
        assert clients.ROUTED_REPLICAS == {"test-engine": 1}

    asyncio.run(scenario())


def test_the_router_counts_the_prompts_it_has_in_flight_and_spills_by_them():
    router = bare_router()
    router.initialize_state(slack=64)  # as Serve calls it with the deployment's request_router_kwargs
    candidates = [replica(r) for r in REPLICAS[:2]]
    home = rendezvous_order("row-1", REPLICAS[:2])[0]
    other = next(r for r in REPLICAS[:2] if r != home)

    def routed(request_id, replica_id, prompts):
        pending = SimpleNamespace(args=[{ROUTE: "x", "prompts": [[1]] * prompts}], kwargs={},
                                  metadata=SimpleNamespace(internal_request_id=request_id))
        router.on_request_routed(pending, SimpleNamespace(unique_id=replica_id), None)

    def first_choice():
        ranked = asyncio.run(router.choose_replicas(candidates, request({ROUTE: "row-1"})))
        return ranked[0][0].replica_id.unique_id

    assert first_choice() == home
    routed("r1", home, 65)
    assert first_choice() == other  # home holds 65 prompts, the other none
    routed("r2", other, 40)
    assert first_choice() == home  # 65 against 40: within the slack
    router.on_request_completed(SimpleNamespace(unique_id=other), "r2")
    router.on_request_completed(SimpleNamespace(unique_id=home), "unknown")  # a request it never counted
    assert first_choice() == other
    router.on_request_completed(SimpleNamespace(unique_id=home), "r1")
    assert first_choice() == home and router._counts()[0] == {home: 0, other: 0}


# --- calls merged while a search runs (pipeline.services.coalescing) -------------------------

class GatedSearch:
    """A scripted search: records the queries of each search, holds the first one until the
    test opens the gate, and answers each query with one hit naming it."""

    def __init__(self):
        self.calls: list[tuple[list[str], int]] = []
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self, queries: list[str], k: int) -> list[list[dict]]:
        self.calls.append((list(queries), k))
        self.started.set()
        if len(self.calls) == 1:
            await self.gate.wait()
        if "boom" in queries:
            raise RuntimeError("index gone")
        return [[{"id": f"{q}@{k}"}] for q in queries]


def test_calls_waiting_behind_a_search_go_into_the_next_one_together():
    async def scenario():
        search = GatedSearch()
        coalesced = CoalescingSearch(search)
        first = asyncio.ensure_future(coalesced(["a"], 5))
        await search.started.wait()  # the first search runs (held at the gate)
        waiting = [asyncio.ensure_future(coalesced(q, k)) for q, k in ((["b", "c"], 5), (["d"], 3), (["e"], 5))]
        await asyncio.sleep(0)  # let them queue
        search.gate.set()
        return search.calls, await first, await asyncio.gather(*waiting)

    calls, first, rest = asyncio.run(scenario())
    assert calls == [(["a"], 5), (["b", "c", "e"], 5), (["d"], 3)]  # merged by k, in arrival order
    assert first == [[{"id": "a@5"}]]
    assert rest == [[[{"id": "b@5"}], [{"id": "c@5"}]], [[{"id": "d@3"}]], [[{"id": "e@5"}]]]


def test_a_merged_search_holds_at_most_max_queries_and_a_larger_call_runs_alone():
    async def scenario():
        search = GatedSearch()
        coalesced = CoalescingSearch(search, max_queries=3)
        first = asyncio.ensure_future(coalesced(["a"], 5))
        await search.started.wait()
        calls = (["b", "c"], ["d"], ["e", "f"], ["g", "h", "i", "j"], ["k"])
        waiting = [asyncio.ensure_future(coalesced(q, 5)) for q in calls]
        await asyncio.sleep(0)
        search.gate.set()
        return search.calls, await first, await asyncio.gather(*waiting)

    calls, first, rest = asyncio.run(scenario())
    # in arrival order, up to 3 queries a search: b c + d; e f (g h i j would pass 3); g h i j alone; k
    assert [queries for queries, _ in calls] == [["a"], ["b", "c", "d"], ["e", "f"], ["g", "h", "i", "j"], ["k"]]
    assert rest[3] == [[{"id": f"{q}@5"}] for q in "ghij"] and rest[4] == [[{"id": "k@5"}]]


def test_a_failed_merged_search_is_run_again_call_by_call_and_fails_only_its_own_call():
    async def scenario():
        search = GatedSearch()
        coalesced = CoalescingSearch(search)
        first = asyncio.ensure_future(coalesced(["a"], 5))
        await search.started.wait()
        merged = [asyncio.ensure_future(coalesced(q, 5)) for q in (["boom"], ["b"])]
        await asyncio.sleep(0)
        search.gate.set()
        results = await asyncio.gather(first, *merged, return_exceptions=True)
        return search.calls, results, await coalesced(["c"], 5), await coalesced([], 5)

    calls, (first, boom, b), later, empty = asyncio.run(scenario())
    assert calls == [(["a"], 5), (["boom", "b"], 5), (["boom"], 5), (["b"], 5), (["c"], 5)]
    assert first == [[{"id": "a@5"}]]
    assert isinstance(boom, RuntimeError) and str(boom) == "index gone"
    assert b == [[{"id": "b@5"}]]  # merged with the bad call, answered as if alone
    assert later == [[{"id": "c@5"}]] and empty == []


def test_a_caller_that_gave_up_is_not_searched_and_a_short_answer_is_an_error():
    async def scenario():
        search = GatedSearch()
        coalesced = CoalescingSearch(search)
        first = asyncio.ensure_future(coalesced(["a"], 5))
        await search.started.wait()
        gone, kept = asyncio.ensure_future(coalesced(["x"], 5)), asyncio.ensure_future(coalesced(["y"], 5))
        await asyncio.sleep(0)
        gone.cancel()  # e.g. its client timed out
        search.gate.set()
        await asyncio.gather(first, kept)

        async def short(queries, k):
            return []  # fewer hit lists than queries
        return search.calls, await asyncio.gather(CoalescingSearch(short)(["q"], 5), return_exceptions=True)

    calls, (error,) = asyncio.run(scenario())
    assert calls == [(["a"], 5), (["y"], 5)]
    assert isinstance(error, RuntimeError) and "0 hit lists for 1 queries" in str(error)


class ScriptedService:
    """A scripted service for ``SameTurnBatcher``: records each call's (key, items), answers each
    item with ``f"{item}@{key}"``; an item "boom" fails the call, "gone" fails it as fatal."""

    def __init__(self):
        self.calls: list[tuple] = []

    async def __call__(self, key, items):
        self.calls.append((key, list(items)))
        await asyncio.sleep(0)  # an answer comes in a later turn
        if "gone" in items:
            raise ServiceUnavailable("the service is gone")
        if "boom" in items:
            raise RuntimeError("bad item")
        return [f"{item}@{key}" for item in items]


def test_calls_of_one_turn_with_one_key_go_as_one_call_and_each_gets_its_slice():
    async def scenario():
        service = ScriptedService()
        batcher = SameTurnBatcher(service)
        together = await asyncio.gather(batcher("r1", ["a", "b"]), batcher("r2", ["c"]), batcher("r1", ["d"]))
        later = await batcher("r1", ["e"])  # another turn: its own call, sent at once
        return service.calls, together, later

    calls, together, later = asyncio.run(scenario())
    assert calls == [("r1", ["a", "b", "d"]), ("r2", ["c"]), ("r1", ["e"])]
    assert together == [["a@r1", "b@r1"], ["c@r2"], ["d@r1"]] and later == ["e@r1"]


def test_callers_answered_together_call_together_again():
    """Trees side by side: the answer of a merged call wakes them in one turn, so their next
    calls merge too (a batch's long-form trees keep one call per depth)."""
    async def scenario():
        service = ScriptedService()
        batcher = SameTurnBatcher(service)

        async def tree(name):
            return [await batcher(5, [f"{name}{depth}"]) for depth in range(3)]

        return service.calls, await asyncio.gather(*(tree(name) for name in "xyz"))

    calls, trees = asyncio.run(scenario())
    assert calls == [(5, ["x0", "y0", "z0"]), (5, ["x1", "y1", "z1"]), (5, ["x2", "y2", "z2"])]
    assert trees[1] == [["y0@5"], ["y1@5"], ["y2@5"]]


def test_a_failed_merged_call_is_sent_again_call_by_call_and_a_fatal_failure_fails_all():
    async def scenario():
        service = ScriptedService()
        batcher = SameTurnBatcher(service, fatal=(ServiceUnavailable,))
        isolated = await asyncio.gather(batcher(1, ["a"]), batcher(1, ["boom"]), batcher(1, ["b"]),
                                        return_exceptions=True)
        isolated_calls, service.calls = service.calls, []
        fatal = await asyncio.gather(batcher(1, ["a"]), batcher(1, ["gone"]), return_exceptions=True)
        return isolated_calls, isolated, service.calls, fatal

    isolated_calls, (a, boom, b), fatal_calls, fatal = asyncio.run(scenario())
    assert isolated_calls == [(1, ["a", "boom", "b"]), (1, ["a"]), (1, ["boom"]), (1, ["b"])]
    assert a == ["a@1"] and b == ["b@1"] and isinstance(boom, RuntimeError) and str(boom) == "bad item"
    assert fatal_calls == [(1, ["a", "gone"])]  # no call-by-call retries of a service gone for good
    assert all(isinstance(r, ServiceUnavailable) for r in fatal)


def test_a_caller_that_gave_up_leaves_the_others_their_answers_and_a_short_answer_is_an_error():
    async def scenario():
        service = ScriptedService()
        batcher = SameTurnBatcher(service)
        gone, kept = asyncio.ensure_future(batcher(1, ["x"])), asyncio.ensure_future(batcher(1, ["y"]))
        await asyncio.sleep(0)  # both sent, merged
        gone.cancel()

        async def short(key, items):
            return items[:-1]
        return await kept, await asyncio.gather(SameTurnBatcher(short)(1, ["q"]), return_exceptions=True)

    kept, (error,) = asyncio.run(scenario())
    assert kept == ["y@1"]
    assert isinstance(error, RuntimeError) and "answered 0 items for 1" in str(error)


def test_the_wrapped_clients_merge_by_route_stop_ids_and_priority_and_by_k():
    async def scenario():
        sent = []

        class Engine:  # an engine client: records each call
            async def generate(self, prompts, max_tokens, route, stop_ids=(), priority=0):
                sent.append(("generate", route, prompts, max_tokens, stop_ids) + ((priority,) if priority else ()))
                return [f"{p[0]}:{m}" for p, m in zip(prompts, max_tokens)]

        class Retriever:
            async def search(self, queries, k):
                sent.append(("search", k, queries))
                return [[{"id": f"{q}@{k}"}] for q in queries]

        engine, retriever = TurnBatchedEngine(Engine()), TurnBatchedRetriever(Retriever())
        out = await asyncio.gather(engine.generate([[1], [2]], [8, 9], "b0"), engine.generate([[3]], [7], "b0", [5]),
                                   engine.generate([[4]], [6], "b0"), engine.generate([[5]], [6], "b1"),
                                   retriever.search(["q"], 2), retriever.search(["r", "s"], 2),
                                   engine.generate([], [], "b0"), retriever.search([], 2),
                                   engine.generate([[6]], [6], "b0", priority=URGENT))
        return out, sent

    out, sent = asyncio.run(scenario())
    assert out == [["1:8", "2:9"], ["3:7"], ["4:6"], ["5:6"], [[{"id": "q@2"}]], [[{"id": "r@2"}], [{"id": "s@2"}]], [], [],
                   ["6:6"]]
    assert sent == [("generate", "b0", [[1], [2], [4]], [8, 9, 6], []), ("generate", "b0", [[3]], [7], [5]),
                    ("generate", "b1", [[5]], [6], []), ("generate", "b0", [[6]], [6], [], URGENT),
                    ("search", 2, ["q", "r", "s"])]


def test_callers_do_not_wait_for_ever_when_the_search_is_cancelled():
    async def scenario():
        search = GatedSearch()  # its first search never ends (the gate stays shut)
        coalesced = CoalescingSearch(search)
        running = asyncio.ensure_future(coalesced(["a"], 5))
        await search.started.wait()
        queued = asyncio.ensure_future(coalesced(["b"], 5))
        await asyncio.sleep(0)
        coalesced._task.cancel()  # as when the replica's event loop shuts down
        return await asyncio.gather(running, queued, return_exceptions=True)

    results = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) and "cancelled" in str(r) for r in results), results


def test_the_retrieval_replica_counts_calls_searches_and_queries():
    """``RetrieverReplica.search`` over a scripted retriever: two calls that waited behind a
    first one are searched together; the counters say 3 calls, 2 searches, 4 queries, and the
    encoder's CPU seconds."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.services.retriever import RetrieverReplica

    class ScriptedRetriever:
        def __init__(self):
            self.searched, self.release = [], threading.Event()
            self.encoder = SimpleNamespace(cpu_seconds=0.0)

        def search(self, queries, k):
            self.encoder.cpu_seconds += 0.25 * len(queries)
            self.searched.append(list(queries))
            self.release.wait(timeout=60)  # the first search holds until the others queue
            return [[{"id": q}] for q in queries]

    async def scenario():
        replica = object.__new__(RetrieverReplica)
        replica.shards, replica.retriever = [], ScriptedRetriever()
        replica.pool = ThreadPoolExecutor(max_workers=1)
        replica.coalesced = CoalescingSearch(replica._search)
        replica.counters = {"seconds": 0.0, "queries": 0, "searches": 0, "encode_cpu_seconds": 0.0}
        replica.reporter = Reporter("retriever", target=None)
        replica.count_into(replica.counters)
        first = asyncio.ensure_future(replica.search(["a"], 3))
        while not replica.retriever.searched:
            await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(replica.search(q, 3)) for q in (["b", "c"], ["d"])]
        await asyncio.sleep(0)
        replica.retriever.release.set()
        return replica, await first, await asyncio.gather(*rest)

    replica, first, rest = asyncio.run(scenario())
    assert replica.retriever.searched == [["a"], ["b", "c", "d"]]
    assert first == [[{"id": "a"}]] and rest == [[[{"id": "b"}], [{"id": "c"}]], [[{"id": "d"}]]]
    c = replica.counters
    assert (c["calls"], c["searches"], c["queries"]) == (3, 2, 4) and c["seconds"] > 0
    assert c["encode_cpu_seconds"] == 1.0
    assert "first_start" in replica.window and "last_end" in replica.window


# --- a replica's reports (pipeline.services.reporting) -------------------------------------


class CapturingReporter:
    """Stands in for a ``Reporter``: keeps every report, and sets ``reported`` on each."""

    def __init__(self):
        self.target, self.reports, self.reported = "job-1", [], asyncio.Event()

    def report(self, wait=False, **values):
        self.reports.append(values)
        self.reported.set()


def test_a_replica_that_runs_out_of_calls_reports_them_without_waiting_for_its_period():
    """Two overlapping calls, then none in flight: one report follows (not one per call), with
    both calls counted, long before ``REPORT_EVERY_S`` (no periodic report runs here at all)."""
    from pipeline.services.reporting import ReportingReplica

    async def scenario():
        replica = ReportingReplica()
        replica.reporter = CapturingReporter()
        replica._recorder = None
        replica.count_into({"queries": 0})
        replica.begin("job-1")
        replica.begin("job-1")
        replica.totals["queries"] += 3
        replica.end()
        assert not replica.reporter.reports  # one call still in flight: no report yet
        replica.end()
        await asyncio.wait_for(replica.reporter.reported.wait(), timeout=30)
        return replica.reporter.reports

    reports = asyncio.run(scenario())
    assert len(reports) == 1
    assert reports[0]["calls"] == 2 and reports[0]["queries"] == 3
    assert reports[0]["first_start"] <= reports[0]["last_end"]


def test_the_calls_a_reused_service_has_not_reported_are_counted_per_service():
    from pipeline.run.stage_metrics import calls_unreported

    stats = {"first_pass": {"engine_calls": 5}, "critique": {"engine_calls": 4, "retriever_calls": 2},
             "retrieve": {"retriever_calls": 3}, "engine": {"calls": 7}, "retriever": {"calls": 5}}
    assert calls_unreported(stats, ["engine", "retriever"]) == {"engine": 2}  # 9 made, 7 reported; 5 of 5
    stats["engine"]["calls"] = 9
    assert calls_unreported(stats, ["engine", "retriever"]) == {}
    assert calls_unreported({"first_pass": {"engine_calls": 1}}, ["engine"]) == {"engine": 1}  # none reported yet


def test_a_stage_reports_the_calls_answered_since_its_last_batch():
    from pipeline.stages.common import ServiceStage

    stage = object.__new__(ServiceStage)
    engine = SimpleNamespace(calls=0)
    stage.clients = {"engine_calls": engine, "retriever_calls": None}  # a stage without the retriever
    stage.calls_reported = dict.fromkeys(stage.clients, 0)
    engine.calls = 3
    assert stage.calls_since_last_report() == {"engine_calls": 3}
    assert stage.calls_since_last_report() == {}
    engine.calls = 4
    assert stage.calls_since_last_report() == {"engine_calls": 1}
