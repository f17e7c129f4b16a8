"""Where an annotation run goes (``runner``): on Ray, or in the driver's own process
(``pipeline.run.in_process``), and how the in-process run batches its rows. Run planning: the
preflight refuses a ``runner=in_process`` that cannot serve the job before any work."""

from __future__ import annotations

from ..infra.config import Config, stage_pools
from ..runtime.ray_connect import would_start_local_ray

#: ``runner=auto`` with running services named: jobs of at most this many rows to annotate run
#: their stages in the driver. Ray Data's stage actors take seconds to start (about 4.4 s of
#: the 120-row bench job's 10.2 s on 2 cores, against 5.6 s for that whole job with its stages
#: in the driver); a larger job is worth them, its stages' CPU spread over the cluster's nodes (the
#: bench's stages take about 6 ms of CPU a row: one driver process feeds at most about 160
#: rows/s, which 20 or so GPU engine replicas would outrun).
STAGES_IN_DRIVER_MAX_ROWS = 2000


def reuses_services(cfg: Config) -> bool:
    """Whether the job names running services (``engine/retrieval.service.deployment``)."""
    return bool(cfg.engine.service.deployment or cfg.retrieval.service.deployment)


def in_process_refusal(cfg: Config) -> str | None:
    """Why the stages cannot run in this process (None: they can). With running services named,
    they call those (all of them the run needs); otherwise the job's own services must fit in
    this process."""
    e, r = cfg.engine.service, cfg.retrieval.service
    if reuses_services(cfg):
        if e.deployment and (r.deployment or cfg.selfrag.mode == "never"):
            return None
        return "it names one running service and would start the other (name both, or neither)"
    if e.replicas > 1 or (e.max_replicas or 1) > 1:
        return "it asks for more than one engine replica (engine.service.replicas, max_replicas)"
    if cfg.selfrag.mode != "never" and (r.replicas > 1 or (r.max_replicas or 1) > 1):
        return "it asks for more than one retrieval replica (retrieval.service.replicas, max_replicas)"
    if cfg.engine.tensor_parallel_size > 1:
        return "engine.tensor_parallel_size > 1 runs the engine's workers on Ray"
    if cfg.retrieval.shards_apart:
        return "retrieval.shards_apart deploys one service per index shard"
    return None


def runs_in_process(cfg: Config, rows: int) -> bool:
    """Whether the run, with ``rows`` rows to annotate, goes in this process: ``runner=in_process``
    (preflight refused it where ``in_process_refusal`` says why not), or ``auto`` where the job
    would start a new local Ray for one engine replica of its own and nothing else needs Ray,
    or where it names the running services it calls and has at most
    ``STAGES_IN_DRIVER_MAX_ROWS`` rows (its stages here, the services on the cluster)."""
    if cfg.runner != "auto":
        return cfg.runner == "in_process"
    if in_process_refusal(cfg) is not None:
        return False
    if reuses_services(cfg):
        return rows <= STAGES_IN_DRIVER_MAX_ROWS
    return would_start_local_ray(cfg.ray.address)


def rows_in_flight(cfg: Config) -> tuple[int, int]:
    """(batch rows, batches in flight): as the run's Ray stages would hold them. Chained
    (``stages.chain``): its batch size, and replicas x concurrent batches; one pool per stage:
    batches of the smallest stage's batch size, as many rows as all the pools hold (replicas x
    concurrent batches x batch)."""
    pools = [stage for _, stage in stage_pools(cfg)]
    batch = min(s.batch_size for s in pools)
    held = sum(s.replicas * s.max_concurrent_batches * s.batch_size for s in pools)
    return batch, max(1, held // batch)
