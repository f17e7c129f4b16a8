"""The annotation dataflow on Ray Data: prepare -> first pass -> retrieve -> critique -> write.

One stream, no branches: rows that need no evidence pass through the later stages untouched.
Resources, replicas and batch sizes come from ``cfg.stages``.
"""

from __future__ import annotations

import pyarrow as pa
import ray

from .config import Config, StageConfig
from .stages.columns import column, set_columns
from .stages.critique import Critique
from .stages.first_pass import FirstPass
from .stages.prepare import prepare_shards
from .stages.retrieve import Retrieve
from .stages.write import ShardWriter


def _task_args(stage: StageConfig) -> dict:
    return dict(batch_size=stage.batch_size, batch_format="pyarrow", num_cpus=stage.num_cpus, num_gpus=stage.num_gpus)


def _actor_args(stage: StageConfig, cfg: Config) -> dict:
    return dict(_task_args(stage), concurrency=stage.replicas, fn_constructor_kwargs={"cfg": cfg})


def mark_all_for_retrieval(batch: pa.Table) -> pa.Table:
    """``always`` mode: every valid row retrieves; no first pass is needed."""
    return set_columns(batch, {"retrieved": [True if e is None else None for e in column(batch, "error")]})


def build_dataset(cfg: Config, shards: dict[str, int], schema: pa.Schema, run_id: str) -> ray.data.Dataset:
    """The lazy dataset whose rows are one summary per written shard.

    ``shards`` maps each shard to annotate to its row count; ``schema`` is the inputs' unified schema.
    """
    st = cfg.stages
    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
    prepare_kwargs = {"cfg": cfg.input, "storage": cfg.storage, "model": cfg.engine.model,
                      "run_id": run_id, "schema": schema}
    ds = ds.map_batches(prepare_shards, fn_kwargs=prepare_kwargs, **_task_args(st.prepare))
    if cfg.selfrag.mode == "always":
        ds = ds.map_batches(mark_all_for_retrieval, batch_format="pyarrow", num_cpus=st.prepare.num_cpus)
    else:
        ds = ds.map_batches(FirstPass, **_actor_args(st.first_pass, cfg))
    if cfg.selfrag.mode != "never":
        ds = ds.map_batches(Retrieve, **_actor_args(st.retrieve, cfg))
        ds = ds.map_batches(Critique, **_actor_args(st.critique, cfg))
    # One writer sees every row, so it can tell when a shard is complete and write it at once.
    return ds.map_batches(ShardWriter, batch_format="pyarrow", concurrency=1, num_cpus=st.write.num_cpus,
                          fn_constructor_kwargs={"cfg": cfg, "expected_rows": shards})
