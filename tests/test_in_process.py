"""The in-process runner (``runner``, ``pipeline.run.in_process``) without an engine: when a job
runs in its own process, how many rows it keeps in flight, its batch loop (order, failures,
replicas that fail to start) and its replicas on threads of their own."""

from __future__ import annotations

import asyncio
import socket
import threading
from types import SimpleNamespace

import pyarrow as pa
import pytest

from pipeline.infra.config import load_config
from pipeline.run.in_process import annotate
from pipeline.run.runner import STAGES_IN_DRIVER_MAX_ROWS, in_process_refusal, rows_in_flight, runs_in_process
from pipeline.run.preflight import PreflightError, preflight
from pipeline.runtime import ray_connect
from pipeline.services.clients import ServiceUnavailable
from pipeline.services.deploy import ServicesUnavailable
from pipeline.services.engine import EngineUnavailable
from pipeline.services.in_process import InProcessEngineClient, InProcessReplica


@pytest.fixture
def no_ray_here(monkeypatch, tmp_path):
    """No RAY_ADDRESS and no Ray recorded on this machine (an address file that does not exist)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_connect, "address_file", lambda: str(tmp_path / "no-ray" / "ray_current_cluster"))
    return tmp_path


@pytest.mark.parametrize("overrides, expected", [
    ([], True),
    (["runner=ray"], False),
    (["runner=in_process"], True),
    (["ray.address=local"], False),  # asked for a (new, local) Ray
    (["ray.address=10.0.0.1:6379"], False),
    (["engine.service.deployment=selfrag-engine"], False),
    (["retrieval.service.deployment=selfrag-retriever"], False),
    (["engine.service.replicas=2"], False),
    (["engine.service.min_replicas=1", "engine.service.max_replicas=3"], False),
    (["retrieval.service.replicas=2"], False),
    (["retrieval.service.replicas=2", "selfrag.mode=never"], True),  # no retriever at all
    (["retrieval.shards_apart=true"], False),
    (["engine.tensor_parallel_size=2"], False),
])
def test_auto_runs_in_process_only_where_the_job_would_start_a_local_ray_for_one_engine(no_ray_here, overrides,
                                                                                          expected):
    assert runs_in_process(load_config([], overrides), rows=100) is expected


def test_auto_joins_a_ray_that_runs_here_and_a_ray_address(no_ray_here, monkeypatch):
    cfg = load_config([], [])
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # ray job submit
    assert not runs_in_process(cfg, rows=100)
    monkeypatch.delenv("RAY_ADDRESS")
    recorded = no_ray_here / "no-ray" / "ray_current_cluster"
    recorded.parent.mkdir()
    with socket.socket() as listening:  # a Ray head that answers on this machine
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        recorded.write_text(f"127.0.0.1:{listening.getsockname()[1]}")
        assert not runs_in_process(cfg, rows=100)
    assert runs_in_process(cfg, rows=100)  # the recorded cluster is gone: a job would start a new local Ray


@pytest.mark.parametrize("overrides, refused", [
    (["engine.service.deployment=e", "retrieval.service.deployment=r"], False),  # the stages here, the services there
    (["engine.service.deployment=e", "selfrag.mode=never"], False),  # never mode needs no retriever
    (["engine.service.deployment=e"], True),  # it would start a retriever of its own beside a running engine
    (["retrieval.service.deployment=r"], True),
])
def test_stages_in_process_on_running_services_need_every_service_the_run_calls(overrides, refused):
    cfg = load_config([], ["runner=in_process", *overrides])
    assert (in_process_refusal(cfg) is not None) is refused
    assert runs_in_process(cfg, rows=10**6)  # runner=in_process is what the user asked (preflight refuses the refused)


@pytest.mark.parametrize("overrides, rows, expected", [
    (["engine.service.deployment=e", "retrieval.service.deployment=r"], 120, True),
    (["engine.service.deployment=e", "retrieval.service.deployment=r"], STAGES_IN_DRIVER_MAX_ROWS, True),
    (["engine.service.deployment=e", "retrieval.service.deployment=r"], STAGES_IN_DRIVER_MAX_ROWS + 1, False),
    (["engine.service.deployment=e", "selfrag.mode=never"], 120, True),
    (["engine.service.deployment=e"], 120, False),  # it starts a retriever of its own: on Ray
    (["engine.service.deployment=e", "retrieval.service.deployment=r", "runner=ray"], 120, False),
])
def test_auto_runs_the_stages_of_a_small_job_on_running_services_in_the_driver(no_ray_here, overrides, rows,
                                                                                 expected):
    assert runs_in_process(load_config([], overrides), rows) is expected


def test_runner_in_process_is_refused_before_any_work_where_it_cannot_serve_the_job(tmp_path):
    assert in_process_refusal(load_config([], [])) is None
    assert "more than one retrieval replica" in in_process_refusal(
        load_config([], ["retrieval.service.min_replicas=1", "retrieval.service.max_replicas=4"]))
    cfg = load_config([], ["runner=in_process", "engine.service.replicas=2", f"output.path={tmp_path / 'out'}"])
    with pytest.raises(PreflightError, match="runner=in_process cannot run this job: it asks for more than one engine "
                                             "replica"):
        preflight(cfg)
    assert not (tmp_path / "out").exists()


def test_an_unknown_runner_is_a_config_error():
    from pipeline.infra.config import ConfigError

    with pytest.raises(ConfigError, match="config key 'runner': 'local' is not one of"):
        load_config([], ["runner=local"])


@pytest.mark.parametrize("overrides, batch, in_flight", [
    # chained (the default): its batch, and replicas x concurrent batches, whatever the mode
    (["selfrag.mode=adaptive"], 32, 28),
    (["selfrag.mode=never", "stages.chain.replicas=2", "stages.chain.batch_size=8"], 8, 2 * 28),
    # one pool per stage: the smallest model stage's batch; rows the pools hold
    # (replicas x concurrent batches x batch) / batch
    (["selfrag.mode=adaptive", "stages.chain=null"], 16, (8 * 32 + 8 * 64 + 8 * 16) // 16),
    (["selfrag.mode=always", "stages.chain=null"], 16, (8 * 64 + 8 * 16) // 16),
    (["selfrag.mode=never", "stages.chain=null"], 32, (8 * 32) // 32),
])
def test_rows_in_flight_match_what_the_ray_stages_would_hold(overrides, batch, in_flight):
    assert rows_in_flight(load_config([], overrides)) == (batch, in_flight)


# --- the batch loop ------------------------------------------------------------------------


class Ready:
    """A replica stand-in whose ``ready`` is already resolved (or failed with ``error``)."""

    def __init__(self, name: str = "engine", error: Exception | None = None):
        from concurrent.futures import Future

        self.name, self.ready, self.start_timeout_s = name, Future(), None
        self.ready.set_exception(error) if error else self.ready.set_result(self)

    async def built(self):
        return await asyncio.wrap_future(self.ready)


class Writer:
    """Collects the rows it is given; a shard's summary once all its rows arrived."""

    def __init__(self, expected: dict[str, int]):
        self.expected, self.rows = expected, {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        for shard, value in zip(batch.column("shard").to_pylist(), batch.column("value").to_pylist()):
            self.rows.setdefault(shard, []).append(value)
        done = [s for s in set(batch.column("shard").to_pylist()) if len(self.rows[s]) == self.expected[s]]
        return pa.table({"shard": done}, schema=pa.schema([("shard", pa.string())]))


def shards(sizes: dict[str, int]) -> list[pa.Table]:
    return [pa.table({"shard": [s] * n, "value": list(range(n))}) for s, n in sizes.items()]


def test_every_batch_goes_through_the_chain_and_every_shard_is_reported_once():
    active, most = 0, 0

    async def double(batch: pa.Table) -> pa.Table:
        nonlocal active, most
        active += 1
        most = max(most, active)
        await asyncio.sleep(0)
        active -= 1
        return batch.set_column(1, "value", pa.array([2 * v for v in batch.column("value").to_pylist()]))

    sizes = {"a": 10, "b": 3, "c": 7}
    writer, reported = Writer(sizes), []
    asyncio.run(annotate(iter(shards(sizes)), [double, double], writer, 4, 2, reported.append, [Ready(), None]))
    assert sorted(s["shard"] for s in reported) == ["a", "b", "c"]
    assert {s: sorted(v) for s, v in writer.rows.items()} == {s: [4 * i for i in range(n)] for s, n in sizes.items()}
    assert most <= 2  # never more batches in flight than asked


def test_a_failed_batch_fails_the_run_with_its_own_error_and_cancels_the_others():
    started, cancelled = [], []

    async def stage(batch: pa.Table) -> pa.Table:
        started.append(batch.column("value")[0].as_py())
        if batch.column("value")[0].as_py() == 4:
            raise ServiceUnavailable("the engine died")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(batch.column("value")[0].as_py())
            raise
        return batch

    with pytest.raises(ServiceUnavailable, match="the engine died"):  # the error itself, not a group of errors
        asyncio.run(annotate(iter(shards({"a": 12})), [stage], Writer({"a": 12}), 4, 3, print, [Ready()]))
    assert started == [0, 4, 8] and sorted(cancelled) == [0, 8]


def test_a_replica_that_failed_to_start_fails_the_run_before_any_batch():
    seen = []

    async def stage(batch):
        seen.append(batch)
        return batch

    with pytest.raises(ServicesUnavailable, match="the retriever failed to start: OSError: no index here"):
        asyncio.run(annotate(iter(shards({"a": 2})), [stage], Writer({"a": 2}), 4, 2, print,
                             [Ready(), Ready("retriever", OSError("no index here"))]))
    assert not seen


def test_a_writer_or_lease_failure_after_a_shard_stops_the_run():
    async def stage(batch):
        return batch

    def on_shard(summary):
        raise RuntimeError(f"lease lost after {summary['shard']}")

    with pytest.raises(RuntimeError, match="lease lost after a"):
        asyncio.run(annotate(iter(shards({"a": 2, "b": 2})), [stage], Writer({"a": 2, "b": 2}), 2, 1, on_shard,
                             [Ready()]))


# --- replicas on threads of their own --------------------------------------------------------


CLOSED: list[str] = []  # names of the Replica objects closed


class Replica:
    """A replica class as Serve runs one: an asynchronous ``__init__`` (``hold``: an event it
    waits for first, as a model loads), asynchronous methods."""

    async def __init__(self, name: str, fail: bool = False, hold: threading.Event | None = None):
        if hold is not None:
            await asyncio.get_running_loop().run_in_executor(None, hold.wait)
        if fail:
            raise FileNotFoundError(f"no model at {name}")
        self.name, self.closed = name, False
        self.loop_thread = threading.current_thread().name

    async def generate(self, request: dict) -> list:
        if request["prompts"] == [[-1]]:  # never answers
            await asyncio.Event().wait()
        if request["prompts"] == [[0]]:
            from pipeline.services.engine import EngineUnavailable

            raise EngineUnavailable("the vLLM engine of this replica died")
        return [(threading.current_thread().name, list(p)) for p in request["prompts"]]

    def close(self) -> None:
        self.closed = True
        CLOSED.append(self.name)


def test_a_replica_is_built_and_called_on_its_own_thread_and_closed():
    replica = InProcessReplica("engine", Replica, "tiny")
    client = InProcessEngineClient(replica)
    out = asyncio.run(client.generate([[1, 2], (3,)], [4, 4], "route"))
    assert out == [("engine-replica", [1, 2]), ("engine-replica", [3])] and client.calls == 1
    built = replica.ready.result()
    assert built.loop_thread == "engine-replica"
    replica.close()
    assert built.closed and not replica.thread.is_alive()


def test_a_dead_engine_ends_the_run_as_a_service_unavailable():
    replica = InProcessReplica("engine", Replica, "tiny")
    try:
        with pytest.raises(ServiceUnavailable, match="the engine died .*rerun the job to resume"):
            asyncio.run(InProcessEngineClient(replica).generate([[0]], [1], "route"))
    finally:
        replica.close()


def test_a_replica_that_fails_to_build_says_why_and_closes_without_waiting():
    replica = InProcessReplica("engine", Replica, "models/none", True)
    with pytest.raises(FileNotFoundError, match="no model at models/none"):
        replica.ready.result(timeout=60)
    replica.close()  # nothing to shut down
    replica.thread.join(60)
    assert not replica.thread.is_alive()


def test_a_run_stopped_while_a_replica_loads_leaves_it_to_shut_down_once_loaded():
    """SIGINT while the engine loads: the run's wait is cancelled, the load is not; the replica,
    closed meanwhile, shuts down as soon as it is built instead of serving."""
    loading = threading.Event()
    replica = InProcessReplica("engine", Replica, "loading", False, loading)

    async def stopped_while_waiting():
        waiting = asyncio.ensure_future(replica.built())
        await asyncio.sleep(0)
        waiting.cancel()

    asyncio.run(stopped_while_waiting())
    assert not replica.ready.cancelled()
    replica.close()  # returns at once: the replica is still loading
    loading.set()
    replica.thread.join(60)
    assert not replica.thread.is_alive() and not replica.ready.done()  # never handed out
    assert "loading" in CLOSED


# --- the in-process engine: continuous batching over a scripted LLMEngine ---------------------


class ScriptedLLMEngine:
    """vLLM's ``LLMEngine`` as the in-process replica uses it: a request of prompt [p] with a
    budget of n tokens finishes after n steps with token ids [p] * n; a prompt [0] is refused
    on arrival; ``fail_at``: the step that raises. ``batches``: the requests of every step."""

    def __init__(self, fail_at: int | None = None):
        self.running, self.batches, self.fail_at, self.shut, self.priorities = {}, [], fail_at, False, []
        self.engine_core = SimpleNamespace(shutdown=lambda: setattr(self, "shut", True))

    def add_request(self, request_id, prompt, params, priority=0):
        if prompt["prompt_token_ids"] == [0]:
            raise ValueError("prompt rejected")
        self.running[request_id] = [prompt["prompt_token_ids"][0], params.max_tokens, 0]
        self.priorities.append(priority)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def step(self):
        if self.fail_at is not None and len(self.batches) == self.fail_at:
            raise RuntimeError("CPU out of memory")
        self.batches.append(sorted(p for p, _, _ in self.running.values()))
        out = []
        for rid, state in list(self.running.items()):
            state[2] += 1
            if state[2] == state[1]:
                del self.running[rid]
                completion = SimpleNamespace(token_ids=[state[0]] * state[1], logprobs=[], cumulative_logprob=-1.0)
                out.append(SimpleNamespace(request_id=rid, finished=True, outputs=[completion]))
        return out


def scripted_replica(engine: ScriptedLLMEngine):
    """An ``InProcessEngineReplica`` over ``engine`` (built as ``start_engine`` would, without vLLM)."""
    from pipeline.runtime.metrics_actor import Reporter
    from pipeline.services.engine import EngineCounters
    from pipeline.services.in_process_engine import InProcessEngineReplica
    from fakes import IDS, decode

    r = object.__new__(InProcessEngineReplica)
    r.ids, r.decode, r._reflection, r.counters = IDS, decode, frozenset(IDS.all_ids), EngineCounters()
    r.waiting, r.failure, r._stepping = {}, None, None
    r.engine, r._recorder, r.reporter = engine, None, Reporter("engine")
    r.count_into({})
    return r


def call(r, prompts, budgets, priority=0):
    return r.generate({"prompts": prompts, "max_tokens": budgets, "stop_ids": [], "priority": priority})


def test_calls_that_arrive_while_the_engine_steps_join_the_steps_under_way():
    engine = ScriptedLLMEngine()
    r = scripted_replica(engine)

    async def overlapping():
        first = asyncio.ensure_future(call(r, [[1], [2]], [3, 1]))
        while not engine.batches and not first.done():  # until the engine ran its first step for the first call
            await asyncio.sleep(0)
        second = await call(r, [[5], [0]], [2, 1], priority=-1)
        return await first, second

    first, second = asyncio.run(overlapping())
    assert [c.token_ids for c in first] == [[1, 1, 1], [2]]
    assert second[0].token_ids == [5, 5] and second[1] == "ValueError: prompt rejected"  # refused: its slot only
    assert [1, 5] in engine.batches  # the second call's request ran in the steps of the first's, not after them
    assert engine.priorities == [0, 0, -1]  # each request with its call's priority (the refused one never added)
    assert r.totals["calls"] == 2 and not engine.running
    r.close()
    assert engine.shut and r.engine is None


def test_a_failed_step_fails_every_waiting_call_and_the_engine_is_dead():
    r = scripted_replica(ScriptedLLMEngine(fail_at=1))
    with pytest.raises(EngineUnavailable, match="died"):
        asyncio.run(call(r, [[1], [2]], [3, 3]))
    assert r.dead() and not r.waiting
    with pytest.raises(EngineUnavailable, match="is dead"):  # and refuses from then on
        asyncio.run(call(r, [[1]], [1]))


def test_a_replica_past_its_timeouts_ends_the_run_as_on_ray():
    """``request_timeout_s`` bounds a call and ``start_timeout_s`` the start (the services'
    settings): one process has no other replica to take over."""
    answering = InProcessReplica("engine", Replica, "tiny", request_timeout_s=0.2)
    try:
        with pytest.raises(ServiceUnavailable, match=r"the engine did not answer within 0.2 s \(request_timeout_s\)"):
            asyncio.run(InProcessEngineClient(answering).generate([[-1]], [1], "route"))
    finally:
        answering.close()
    loading = threading.Event()
    never_ready = InProcessReplica("retriever", Replica, "slow", False, loading, start_timeout_s=0.2)
    try:
        with pytest.raises(ServicesUnavailable, match=r"the retriever did not start within 0.2 s \(start_timeout_s\)"):
            asyncio.run(annotate(iter(shards({"a": 1})), [], Writer({"a": 1}), 1, 1, print, [never_ready]))
    finally:
        never_ready.close()
        loading.set()
