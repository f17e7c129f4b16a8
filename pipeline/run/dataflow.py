"""The annotation dataflow on Ray Data: prepare -> first pass -> retrieve -> critique -> write.

One stream, no branches: rows that need no evidence pass through the later stages untouched.
The model stages are thin CPU actors calling the engine and retrieval services (Ray Serve):
chained in one actor pool (``stages.chain``, the default) or one pool per stage; each actor
keeps ``max_concurrent_batches`` batches in flight. Every stage declares the columns it reads
and writes, and the chain is checked here before anything runs. Resources, replicas and batch
sizes come from ``cfg.stages``.
"""

from __future__ import annotations

import logging
import math

import pyarrow as pa
import ray

from ..infra.config import Config, StageConfig, model_stages, stage_pools
from ..output.folder import OutputFolder
from ..services.deploy import Services
from ..stages.columns import ALL_TYPES
from ..stages.contract import Contract, check_chain
from ..stages.chain import STAGE_ACTORS, ChainStage
from ..stages.prepare import prepare_contract, prepare_shards
from ..stages.write import ShardWriter, writer_contract
from ..model.tokenizer import TokenizerSpec


#: Blocks queued at the writer's actor at once.
WRITER_TASKS = 16
#: Target size of the dataflow's blocks (Ray Data's default is 128 MiB): about two chain batches'
#: output. Each block costs the writer's actor and the driver's scheduling a step, so blocks of
#: 32 KiB (half a batch's output: 100 blocks for 1,600 rows) took make bench's harness 0.18 ms
#: of CPU per engine request more (1.50 and 1.55 ms against 1.31 and 1.38; 512 KiB: 1.28).
BLOCK_BYTES = 128 * 1024
#: Ray Data's limit of the batches of one task in an async stage at once (``allow_batches_in_flight``).
LIMIT_NAME = "DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY"
log = logging.getLogger(__name__)


def always_contract(cfg: Config) -> Contract:
    """``always`` mode's stand-in for the first pass."""
    return Contract("always_retrieve", reads={"error": pa.string()}, writes={"retrieved": ALL_TYPES["retrieved"]})


def mark_all_for_retrieval(batch: pa.Table, cfg: Config) -> pa.Table:
    """``always`` mode: every valid row retrieves; no first pass is needed."""
    view = always_contract(cfg).view(batch)
    view.set(retrieved=[True if e is None else None for e in view["error"]])
    return view.result()


def stage_contracts(cfg: Config, schema: pa.Schema) -> list[Contract]:
    """The contracts of the run's stages, in dataflow order."""
    contracts = [prepare_contract(cfg, schema)] + ([always_contract(cfg)] if cfg.selfrag.mode == "always" else [])
    models = [STAGE_ACTORS[name].logic.contract(cfg) for name in model_stages(cfg.selfrag.mode)]
    return contracts + models + [writer_contract(cfg)]


def allow_batches_in_flight(batches: int) -> None:
    """Let one Ray Data task of an asynchronous stage keep ``batches`` batches in flight.

    Ray Data runs the batches of one task (one input bundle) through an async ``__call__`` at
    most ``RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY`` (4) at a time, in order; it reads
    that number once, when ``ray.data`` is imported, and bakes it into each operator as the
    dataflow is planned, in the driver. The first model stage's tasks are whole prepared shards
    (prepare is fused into it), so a shard of 400 rows went through the chained stages 4
    batches at a time (measured: the engine ran 50 sequences on average instead of about 210).
    Ray Data has no public setting for it; the pinned Ray has this module attribute, and
    ``tests/test_dataflow_in_flight.py`` fails on a Ray without it. It stays set in this
    process: every dataflow built here sets its own."""
    try:
        from ray.data._internal.planner import plan_udf_map_op
    except ImportError:
        plan_udf_map_op = None
    if not hasattr(plan_udf_map_op, LIMIT_NAME):
        log.warning("this Ray Data has no %s where the pinned one has it: a Ray Data task's batches may "
                    "go through the model stages 4 at a time", LIMIT_NAME)
        return
    setattr(plan_udf_map_op, LIMIT_NAME, max(batches, 1))


def shards_per_actor(stage: StageConfig, shards: dict[str, int]) -> int:
    """How many shards one actor of the first model stage works on at once. Prepare is fused into
    that stage, so each of its Ray Data tasks is a whole shard, and an actor would take up to
    ``max_concurrent_batches`` of them at once and finish them all near the end. Enough shards
    for its batches in flight (at the mean shard's rows, plus one), and no more: shards are then
    finished and written one after another."""
    mean_rows = sum(shards.values()) / max(len(shards), 1)
    needed = math.ceil(stage.max_concurrent_batches * stage.batch_size / max(mean_rows, 1.0)) + 1
    return max(1, min(stage.max_concurrent_batches, needed))


def _actor_stage(ds: ray.data.Dataset, cls, stage: StageConfig, cfg: Config, tokenizer: TokenizerSpec,
                 services: Services, tasks_per_actor: int | None = None) -> ray.data.Dataset:
    concurrent = stage.max_concurrent_batches
    tasks = tasks_per_actor or concurrent  # later stages: each task a block of tens of rows
    kwargs = {"cfg": cfg, "tokenizer": tokenizer, "engine_app": services.engine, "retriever_app": services.retriever,
              "batches_in_flight": concurrent}
    return ds.map_batches(
        cls, fn_constructor_kwargs=kwargs,
        batch_size=stage.batch_size, batch_format="pyarrow", num_cpus=stage.num_cpus,
        compute=ray.data.ActorPoolStrategy(size=stage.replicas, max_concurrent_calls_per_actor=tasks,
                                           max_tasks_in_flight_per_actor=2 * tasks))


def build_dataset(cfg: Config, output: OutputFolder, shards: dict[str, int], schema: pa.Schema, run_id: str,
                  annotation_hash: str, tokenizer: TokenizerSpec, services: Services,
                  versions: dict[str, dict] | None = None, identity: dict | None = None) -> ray.data.Dataset:
    """The lazy dataset whose rows are one summary per written shard.

    ``output`` is the run's output (its storage reads the inputs); ``shards`` maps each shard to
    annotate to its row count; ``schema`` is the inputs' unified schema; ``annotation_hash`` names the staged rows to reuse and add to; ``tokenizer`` the
    model's tokenizer spec; ``versions`` the input shards' versions and ``identity`` the annotation
    identity of ``annotation_hash``, which the writer records in each shard's marker.
    Raises ContractError if the stages do not chain.
    """
    check_chain({f.name: f.type for f in schema}, stage_contracts(cfg, schema))
    # Small blocks: a stage task's rows move on to the next stage a few batches at a time (a
    # shard-sized block would hold them back until the whole shard passed the stage, and the
    # stages would not overlap). Rows here are small, so blocks of this size hold tens of rows.
    ray.data.DataContext.get_current().target_max_block_size = BLOCK_BYTES
    st = cfg.stages
    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
    prepare_kwargs = {"cfg": cfg.input, "selfrag": cfg.selfrag, "output": output, "model": cfg.engine.model,
                      "run_id": run_id, "schema": schema, "tokenizer": tokenizer, "annotation_hash": annotation_hash}
    ds = ds.map_batches(prepare_shards, fn_kwargs=prepare_kwargs, batch_size=st.prepare.batch_size,
                        batch_format="pyarrow", num_cpus=st.prepare.num_cpus)
    if cfg.selfrag.mode == "always":
        ds = ds.map_batches(mark_all_for_retrieval, fn_kwargs={"cfg": cfg}, batch_format="pyarrow",
                            num_cpus=st.prepare.num_cpus)
    pools = stage_pools(cfg)
    allow_batches_in_flight(max(stage.max_concurrent_batches for _, stage in pools))
    for n, (name, stage) in enumerate(pools):
        ds = _actor_stage(ds, ChainStage if name == "chain" else STAGE_ACTORS[name], stage, cfg, tokenizer, services,
                          shards_per_actor(stage, shards) if n == 0 else None)
    # One writer sees every row, so it can tell when a shard is complete and write it at once.
    # Its blocks queue at its actor (Ray Data's default keeps 2 there): at the end of a run the
    # last batches' blocks come at once, and 2 at a time they took 27 ms each, 0.8 s for 31 blocks.
    return ds.map_batches(ShardWriter, batch_format="pyarrow", num_cpus=st.write.num_cpus,
                          compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=WRITER_TASKS),
                          fn_constructor_kwargs={"cfg": cfg, "expected_rows": shards,
                                                 "annotation_hash": annotation_hash, "versions": versions,
                                                 "identity": identity})

