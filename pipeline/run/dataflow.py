"""The annotation dataflow on Ray Data: prepare -> first pass -> retrieve -> critique -> write.

One stream, no branches: rows that need no evidence pass through the later stages untouched.
The model stages are thin CPU actors calling the engine and retrieval services (Ray Serve);
each keeps ``max_concurrent_batches`` batches in flight. Every stage declares the columns it
reads and writes, and the chain is checked here before anything runs. Resources, replicas and
batch sizes come from ``cfg.stages``.
"""

from __future__ import annotations

import pyarrow as pa
import ray

from ..infra.config import Config, StageConfig
from ..output.folder import OutputFolder
from ..services.deploy import Services
from ..stages.columns import ALL_TYPES
from ..stages.contract import Contract, check_chain
from ..stages.critique import Critique, CritiqueStage
from ..stages.first_pass import FirstPass, FirstPassStage
from ..stages.prepare import prepare_contract, prepare_shards
from ..stages.retrieve import Retrieve, RetrieveStage
from ..stages.write import ShardWriter, writer_contract
from ..model.tokenizer import TokenizerSpec


#: Target size of the dataflow's blocks (Ray Data's default is 128 MiB).
BLOCK_BYTES = 32 * 1024


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
    mode = cfg.selfrag.mode
    contracts = [prepare_contract(cfg, schema), always_contract(cfg) if mode == "always" else FirstPass.contract(cfg)]
    if mode != "never":
        contracts += [Retrieve.contract(cfg), Critique.contract(cfg)]
    return contracts + [writer_contract(cfg)]


def _actor_stage(ds: ray.data.Dataset, cls, stage: StageConfig, cfg: Config, tokenizer: TokenizerSpec,
                 services: Services) -> ray.data.Dataset:
    concurrent = stage.max_concurrent_batches
    kwargs = {"cfg": cfg, "tokenizer": tokenizer, "engine_app": services.engine, "retriever_app": services.retriever}
    return ds.map_batches(
        cls, fn_constructor_kwargs=kwargs,
        batch_size=stage.batch_size, batch_format="pyarrow", num_cpus=stage.num_cpus,
        compute=ray.data.ActorPoolStrategy(size=stage.replicas, max_concurrent_calls_per_actor=concurrent,
                                           max_tasks_in_flight_per_actor=2 * concurrent))


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
    else:
        ds = _actor_stage(ds, FirstPassStage, st.first_pass, cfg, tokenizer, services)
    if cfg.selfrag.mode != "never":
        ds = _actor_stage(ds, RetrieveStage, st.retrieve, cfg, tokenizer, services)
        ds = _actor_stage(ds, CritiqueStage, st.critique, cfg, tokenizer, services)
    # One writer sees every row, so it can tell when a shard is complete and write it at once.
    return ds.map_batches(ShardWriter, batch_format="pyarrow", num_cpus=st.write.num_cpus,
                          compute=ray.data.ActorPoolStrategy(size=1),
                          fn_constructor_kwargs={"cfg": cfg, "expected_rows": shards,
                                                 "annotation_hash": annotation_hash, "versions": versions,
                                                 "identity": identity})

