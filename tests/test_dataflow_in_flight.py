"""Batches in flight in the model stages' actors: Ray Data lets one task keep as many batches in
an async stage as the stage asks for (``dataflow.allow_batches_in_flight``; its default is 4),
and an actor holds itself to its ``max_concurrent_batches`` over all its tasks (``InFlightLimit``).

The Ray test counts the batches that are inside the stage at once; each batch waits (an event,
no sleep) until the count it is looking for is reached, or gives up after 20 s, so a limit
that holds the count lower fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import sys

import pyarrow as pa
import pytest

from pipeline.run import dataflow
from pipeline.stages.common import InFlightLimit


class Gate:
    """An async stage whose batches wait until ``wanted`` of them are in it at once; each
    batch's rows carry the most that were."""

    def __init__(self, wanted: int):
        self.wanted, self.inside, self.most = wanted, 0, 0
        self.reached = asyncio.Event()

    async def __call__(self, batch: pa.Table) -> pa.Table:
        self.inside += 1
        self.most = max(self.most, self.inside)
        if self.inside >= self.wanted:
            self.reached.set()
        try:
            await asyncio.wait_for(self.reached.wait(), timeout=20)
        except asyncio.TimeoutError:
            pass
        self.inside -= 1
        return batch.append_column("most", pa.array([self.most] * batch.num_rows))


@pytest.mark.integration
def test_one_task_keeps_the_stages_batches_in_flight(ray_session):
    import ray
    from ray import cloudpickle
    from ray.data._internal.planner import plan_udf_map_op

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import a test module
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    default = getattr(plan_udf_map_op, dataflow.LIMIT_NAME)  # the attribute the pinned Ray has (4, or a run's)
    try:
        dataflow.allow_batches_in_flight(8)
        ds = ray.data.from_arrow(pa.table({"x": list(range(64))}))  # one block: one task
        out = ds.map_batches(Gate, fn_constructor_kwargs={"wanted": 8}, batch_size=4, batch_format="pyarrow",
                             compute=ray.data.ActorPoolStrategy(size=1, max_concurrent_calls_per_actor=8))
        assert max(row["most"] for row in out.take_all()) == 8  # Ray Data's own limit: 4
    finally:
        setattr(plan_udf_map_op, dataflow.LIMIT_NAME, default)


def test_an_actor_holds_itself_to_its_batches_in_flight():
    async def run(limit: InFlightLimit, batches: int) -> int:
        inside = most = 0

        async def batch():
            nonlocal inside, most
            async with limit.slot():
                inside += 1
                most = max(most, inside)
                for _ in range(3):  # let the others run meanwhile
                    await asyncio.sleep(0)
                inside -= 1

        await asyncio.gather(*(batch() for _ in range(batches)))
        return most

    assert asyncio.run(run(InFlightLimit(3), 10)) == 3
    assert asyncio.run(run(InFlightLimit(None), 10)) == 10  # in one process the run holds its batches itself


def test_an_actor_of_the_first_model_stage_works_on_as_many_shards_as_its_batches_need():
    from pipeline.infra.config import ChainStageConfig

    stage = ChainStageConfig()  # 28 batches of 32 rows: 896 rows in flight
    assert dataflow.shards_per_actor(stage, {"a": 10_000, "b": 10_000}) == 2  # ceil(896 / 10000) + 1
    assert dataflow.shards_per_actor(stage, dict.fromkeys("abcdefgh", 200)) == 6  # ceil(896 / 200) + 1
    assert dataflow.shards_per_actor(stage, dict.fromkeys("abcd", 20)) == 28  # never more than its batches
    assert dataflow.shards_per_actor(stage, {}) == 28
