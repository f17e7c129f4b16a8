"""The simulated engine: the latency model's arithmetic (worked by hand), the recording's round
trip, and a replica answering exactly what was recorded (no Ray, no model). How closely a
sleeping replica follows the model is a benchmark figure (``make bench-scale``,
``latency_model_ratio``), not a timed test."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.infra.config import SimulatedEngineConfig, load_config
from pipeline.selfrag.scoring import Continuation
from pipeline.services.recording import Recorder, output_of, read_records, record_line, request_key
from pipeline.services.simulated_engine import (BatchSchedule, PrefixCache, ScheduledPrompt, SimulatedEngineReplica,
                                                predicted_seconds)

MODEL = SimulatedEngineConfig(step_s=1.0, max_num_seqs=2, prefill_s_per_1k_tokens=1.0)


def test_the_schedule_batches_continuously_and_charges_prefill_to_the_admitting_step():
    """Two slots. Step 1 admits A (2 tokens, 1000 to prefill) and B (1 token): 1 s + 1 s of
    prefill; B ends. Step 2 admits C (1 token, 500 to prefill) into B's slot: 1 s + 0.5 s; A and
    C end. 3.5 s in all."""
    schedule = BatchSchedule(MODEL)
    a, b, c = ScheduledPrompt(2, 1000, "a"), ScheduledPrompt(1, 0, "b"), ScheduledPrompt(1, 500, "c")
    for seq in (a, b, c):
        schedule.submit(seq)
    assert schedule.step() == (2.0, [b])
    assert schedule.running == [a] and [seq for *_, seq in schedule.waiting] == [c]
    assert schedule.step() == (1.5, [a, c])
    assert not schedule.busy()
    assert predicted_seconds(MODEL, [(2, 1000), (1, 0), (1, 500)]) == 3.5


def test_a_lower_priority_is_admitted_first_and_equal_priorities_in_arrival_order():
    """Two slots, A running; B, C (priority 0) and D, E (priority -1, first passes) wait:
    the free slot takes D, then E, then B, then C, one step each (1-token prompts)."""
    schedule = BatchSchedule(MODEL)
    a = ScheduledPrompt(9, 0, "a")
    b, c, d, e = (ScheduledPrompt(1, 0, name) for name in "bcde")
    schedule.submit(a)
    schedule.step()
    for seq, priority in ((b, 0), (c, 0), (d, -1), (e, -1)):
        schedule.submit(seq, priority)
    assert [schedule.step()[1] for _ in range(4)] == [[d], [e], [b], [c]]
    assert schedule.running == [a]


def test_a_full_batch_makes_later_prompts_wait_for_a_slot():
    """One slot, three 2-token prompts: six steps of 1 s, one after the other."""
    one = SimulatedEngineConfig(step_s=1.0, max_num_seqs=1, prefill_s_per_1k_tokens=0.0)
    assert predicted_seconds(one, [(2, 0)] * 3) == 6.0
    assert predicted_seconds(MODEL, [(2, 0)] * 3) == 4.0  # two slots: A and B in steps 1-2, C in 3-4
    assert predicted_seconds(MODEL, [(0, 0)]) == 1.0  # an empty continuation still costs its step


def test_the_prefix_cache_serves_whole_blocks_of_a_known_prefix():
    cache = PrefixCache(block_tokens=4)
    assert cache.uncached(list(range(10))) == (10, 0)  # blocks [0..3] and [4..7] cached; the tail is not a block
    assert cache.uncached(list(range(8)) + [99]) == (1, 8)
    assert cache.uncached([5] + list(range(1, 10))) == (10, 0)  # another first block: nothing after it is shared
    assert cache.uncached(list(range(4)) + [7, 7, 7, 7]) == (4, 4)  # only the first block is a known prefix


def test_a_recorded_continuation_and_error_come_back_as_they_were():
    cont = Continuation(token_ids=[5, 6, 2], logprobs=[{32001: -0.5, 32002: -1.25}, {}, {32003: -3.0}],
                        cumulative_logprob=-0.75, text="a [Relevant]")
    import json

    line = json.loads(record_line([1, 2, 3], 8, [2], cont))
    assert line["prompt"] == [1, 2, 3] and line["max_tokens"] == 8 and line["stop_ids"] == [2]
    assert output_of(line) == cont
    error = json.loads(record_line([1], 4, [], "PromptTooLong: prompt is 2000 tokens"))
    assert output_of(error) == "PromptTooLong: prompt is 2000 tokens"
    assert request_key([1, 2, 3], 8, [2]) == ((1, 2, 3), 8, (2,)) != request_key([1, 2, 3], 9, [2])


def test_a_simulated_replica_answers_what_the_real_engine_answered(tmp_path):
    """Recorded outputs of two calls; the replica returns each prompt's own continuation (equal
    to the recorded one), an error string for a prompt it has no recording of, and counts the
    requests, tokens and cache hits as the real replica's counters do."""
    first = Continuation(token_ids=[7, 8], logprobs=[{32001: -0.1}, {32002: -0.2}], cumulative_logprob=-0.3, text="x")
    second = Continuation(token_ids=[9], logprobs=[{}], cumulative_logprob=-0.4, text="y")
    recorder = Recorder(str(tmp_path / "rec"))
    recorder.write([[1] * 20, [1] * 16 + [2, 3]], [4, 4], [2], [first, second])
    recorder.write([[5, 6]], [3], [], ["PromptTooLong: too long"])
    recorder.flush()
    assert len(read_records(tmp_path / "rec")) == 3

    cfg = load_config([], [f"engine.simulated.recording={tmp_path / 'rec'}", "engine.simulated.step_s=0.001",
                           "engine.simulated.prefill_s_per_1k_tokens=0"])

    async def scenario():
        replica = object.__new__(SimulatedEngineReplica)  # as Serve builds it: the __init__ is asynchronous
        await replica.__init__(cfg.engine, cfg.storage, None)
        outs = await replica.generate({"route": "r", "prompts": [[1] * 16 + [2, 3], [1] * 20, [4, 4]],
                                       "max_tokens": [4, 4, 4], "stop_ids": [2]})
        refused = await replica.generate({"prompts": [[5, 6]], "max_tokens": [3], "stop_ids": []})
        counters = dict(replica.counters)
        replica.__del__()
        return outs, refused, counters

    outs, refused, counters = asyncio.run(scenario())
    assert outs[0] == second and outs[1] == first
    assert outs[2].startswith("NotRecorded: ")
    assert refused == ["PromptTooLong: too long"]
    assert counters["requests"] == 2 and counters["generated_tokens"] == 3 and counters["prompt_tokens"] == 38
    assert counters["prefix_cache_hits"] == 16  # the second prompt of the call shares one 16-token block


def test_a_recording_without_requests_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = load_config([], [f"engine.simulated.recording={tmp_path / 'empty'}"])

    async def start():
        replica = object.__new__(SimulatedEngineReplica)
        await replica.__init__(cfg.engine, cfg.storage, None)

    with pytest.raises(LookupError, match="no recorded requests"):
        asyncio.run(start())


def test_simulated_engine_settings_are_checked():
    from pipeline.infra.config import ConfigError

    for bad in ("engine.simulated.step_s=0", "engine.simulated.max_num_seqs=0",
                "engine.simulated.recording=s3://bucket/requests"):
        with pytest.raises(ConfigError, match="engine.simulated"):
            load_config([], [bad])


@pytest.mark.parametrize("handler", ["benchmark", "job"])
def test_sigterm_stops_the_scale_benchmark_through_its_cleanup_and_exits_143(monkeypatch, handler):
    """``make bench-scale``'s SIGTERM handler stops the main thread (a ``SystemExit`` raised in a
    handler inside a Ray call is lost), and the job exits 128 + 15 after its cleanup ran; also
    when the signal came while a job's run had its own handler installed (``Interrupted``)."""
    import signal

    from jobs.bench_scale import main
    from pipeline.bench import scale
    from pipeline.run.signals import Interrupted
    from pipeline.runtime import main_stop

    cleaned = []

    def benchmark(*_args):
        try:  # as if the signal arrived inside the run
            if handler == "benchmark":
                scale.stop_on_sigterm(signal.SIGTERM, None)
            main_stop.stop(Interrupted(signal.SIGTERM))
        finally:
            cleaned.append(True)  # the cluster's shutdown

    monkeypatch.setattr(scale, "benchmark", benchmark)
    try:
        with pytest.raises(SystemExit) as exited:
            main([])
    finally:
        main_stop.forget()
    assert exited.value.code == 143 and cleaned == [True]


def test_the_scale_benchmark_measures_rows_from_the_first_batch_and_the_replicas_model_time():
    from pipeline.bench.scale import model_seconds, rows_window

    stages = {"engine": {"first_start": -0.5}, "first_pass": {"first_start": 5.0}, "retrieve": {"first_start": 5.7},
              "critique": {"first_start": 7.8}, "write": {"first_start": 9.0, "last_end": 30.25}}
    assert rows_window(stages) == (5.0, 30.25)  # not the engine's first call (the job checking the services)
    del stages["first_pass"]  # always mode: no first pass
    assert rows_window(stages) == (5.7, 30.25)
    model = SimulatedEngineConfig(step_s=0.03, max_num_seqs=16, prefill_s_per_1k_tokens=0.04)
    engine = {"steps": 1000, "prompt_tokens": 250_000, "prefix_cache_hits": 50_000}
    assert model_seconds(engine, model) == pytest.approx(1000 * 0.03 + 200_000 * 0.04 / 1000)  # 30 s + 8 s


def test_the_engines_schedule_long_form_trees_first_unless_the_config_says_fcfs():
    from pipeline.infra.config import load_config
    from pipeline.model.vllm_engine import engine_kwargs

    assert engine_kwargs(load_config([], []).engine)["scheduling_policy"] == "priority"
    assert engine_kwargs(load_config([], ["engine.extra.scheduling_policy=fcfs"]).engine)["scheduling_policy"] == "fcfs"
