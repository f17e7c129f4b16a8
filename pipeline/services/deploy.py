"""Start and remove the job's Serve applications: the engine service and the retrieval service.

Serve runs without an HTTP proxy (deployment handles only). Each application is deployed by
the job and deleted at its end, unless ``<service>.deployment`` names an application that is
already running: then the job uses it and leaves it running.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..config import Config, ServiceConfig
from ..tokenizer import TokenizerSpec

log = logging.getLogger(__name__)

ENGINE_APP, RETRIEVER_APP = "selfrag-engine", "selfrag-retriever"


@dataclass
class Services:
    """The applications a run uses: their names, and those the job deployed (and removes)."""

    engine: str | None = None
    retriever: str | None = None
    owned: list[str] = field(default_factory=list)


def replica_options(svc: ServiceConfig, env: dict | None = None, gpus_per_worker: float | None = None,
                    workers: int = 1) -> dict:
    """Serve deployment options from a service config: replicas or autoscaling, resources,
    concurrency, health checks; ``workers`` > 1 (tensor parallelism) reserves a placement group
    of one bundle for the replica and one GPU bundle per worker."""
    options = {
        "max_ongoing_requests": svc.max_ongoing_requests,
        "health_check_period_s": svc.health_check_period_s,
        "health_check_timeout_s": max(30.0, 3 * svc.health_check_period_s),
        "ray_actor_options": {"num_cpus": svc.num_cpus, "num_gpus": svc.num_gpus if workers == 1 else 0,
                              "runtime_env": {"env_vars": {k: str(v) for k, v in (env or {}).items()}}},
    }
    if svc.min_replicas is not None and svc.max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": svc.min_replicas, "max_replicas": svc.max_replicas,
                                         "initial_replicas": svc.replicas,
                                         "target_ongoing_requests": svc.target_ongoing_requests}
    else:
        options["num_replicas"] = svc.replicas
    if workers > 1:
        options["placement_group_bundles"] = [{"CPU": svc.num_cpus}] + [{"GPU": gpus_per_worker or 1.0}] * workers
        options["placement_group_strategy"] = "PACK"
    return options


def engine_application(cfg: Config, tokenizer: TokenizerSpec):
    """The engine service as a Serve application (not yet running)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from .engine import EngineReplica
    from .routing import RowAffinityRouter

    tp = cfg.engine.tensor_parallel_size
    options = replica_options(cfg.engine.service, cfg.engine.env, cfg.engine.service.num_gpus, tp)
    options["request_router_config"] = RequestRouterConfig(request_router_class=RowAffinityRouter)
    return serve.deployment(EngineReplica, name="SelfRagEngine").options(**options).bind(
        cfg.engine, cfg.storage, tokenizer, cfg.debug.record_engine_requests)


def retriever_application(cfg: Config, tokenizer: TokenizerSpec):
    """The retrieval service as a Serve application (not yet running)."""
    from ray import serve

    from .retriever import RetrieverReplica

    options = replica_options(cfg.retrieval.service)
    return serve.deployment(RetrieverReplica, name="SelfRagRetriever").options(**options).bind(
        cfg.retrieval, cfg.storage)


def start_services(cfg: Config, tokenizer: TokenizerSpec, retrieval: bool) -> Services:
    """Deploy (or find) the engine service, and the retrieval service when ``retrieval``, and
    wait until they run (on a small machine, starting the stages meanwhile would only slow the
    engine's start-up down)."""
    from ray import serve
    from ray.serve.api import RunTarget, run_many

    serve.start(proxy_location="Disabled")
    services, targets = Services(), []
    wanted = [("engine", cfg.engine.service, ENGINE_APP, engine_application)]
    if retrieval:
        wanted.append(("retriever", cfg.retrieval.service, RETRIEVER_APP, retriever_application))
    running = set(serve.status().applications)
    for attr, svc, default_name, build in wanted:
        if svc.deployment:
            if svc.deployment not in running:
                raise RuntimeError(f"{attr}.service.deployment: no running Serve application named "
                                   f"{svc.deployment!r} (running: {sorted(running)})")
            setattr(services, attr, svc.deployment)
            continue
        setattr(services, attr, default_name)
        services.owned.append(default_name)
        targets.append(RunTarget(target=build(cfg, tokenizer), name=default_name, route_prefix=None))
    if targets:
        run_many(targets, wait_for_applications_running=True)
    return services


def stop_services(services: Services) -> None:
    """Delete the applications this job deployed (reused ones keep running)."""
    from ray import serve

    for name in services.owned:
        try:
            serve.delete(name)
        except Exception as exc:  # noqa: BLE001 - the run's outcome is decided; say it and go on
            log.warning("could not delete Serve application %s: %s", name, exc)
