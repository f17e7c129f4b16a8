"""Start and remove the job's Serve applications: the engine service and the retrieval service.

Serve runs without an HTTP proxy (deployment handles only). Each application is deployed by
the job and deleted at its end, unless ``<service>.deployment`` names an application that is
already running: then the job uses it and leaves it running.
"""

from __future__ import annotations

import _thread
import logging
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..runtime import main_stop, phases
from ..infra.config import Config, ServiceConfig, stage_pools
from ..infra.io import Storage
from ..runtime.metrics_actor import job_actor_name
from ..model.tokenizer import TokenizerSpec

log = logging.getLogger(__name__)

ENGINE_APP, RETRIEVER_APP = "selfrag-engine", "selfrag-retriever"
#: The thread that watches a job's services start beside its dataflow, and how long the job's
#: end waits for it to see that the job ended (at most one Serve status call under way).
WATCH_THREAD, WATCH_JOIN_S = "services-watch", 30.0


@dataclass
class Services:
    """The applications a run uses: their names, and those the job deployed (and removes)."""

    engine: str | None = None
    retriever: str | None = None
    owned: list[str] = field(default_factory=list)
    #: How long the owned applications may take to run, and what to say if they do not.
    start_timeout_s: float = 0.0
    why_not: str = ""


def replica_options(svc: ServiceConfig, env: dict | None = None, gpus_per_worker: float | None = None,
                    workers: int = 1) -> dict:
    """Serve deployment options from a service config: replicas or autoscaling, resources,
    concurrency, health checks; ``workers`` > 1 (tensor parallelism) reserves a placement group
    of one bundle for the replica and one GPU bundle per worker."""
    options = {
        "max_ongoing_requests": svc.max_ongoing_requests,
        "health_check_period_s": svc.health_check_period_s,
        "health_check_timeout_s": max(30.0, 3 * svc.health_check_period_s),
        # a replica being stopped waits this long before it first checks for requests in flight
        # (Serve's default, 2 s, is added to the end of every job that deletes its services)
        "graceful_shutdown_wait_loop_s": 0.2,
        # no access-log line per call: a job makes thousands, each formatted, written and tailed
        # by Ray's log monitor (errors are still logged, by the stages and the replicas)
        "logging_config": {"enable_access_log": False},
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
    """The engine service as a Serve application (not yet running): vLLM replicas, or simulated
    ones when ``engine.simulated.recording`` is set."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from .engine import EngineReplica
    from .routing import RowAffinityRouter
    from .simulated_engine import SimulatedEngineReplica

    tp = cfg.engine.tensor_parallel_size
    options = replica_options(cfg.engine.service, cfg.engine.env, cfg.engine.service.num_gpus, tp)
    options["request_router_config"] = RequestRouterConfig(request_router_class=RowAffinityRouter,
                                                           request_router_kwargs={"slack": replica_batch(cfg)})
    body = SimulatedEngineReplica if cfg.engine.simulated.recording else EngineReplica
    return serve.deployment(body, name="SelfRagEngine").options(**options).bind(
        cfg.engine, cfg.storage, tokenizer, cfg.debug.record_engine_requests, job_actor_name())


def replica_batch(cfg: Config) -> int:
    """Sequences one engine replica runs at once (the router's slack): the simulated engine's
    ``max_num_seqs``, else vLLM's (``engine.extra.max_num_seqs``, or vLLM's default)."""
    from .routing import DEFAULT_SLACK

    if cfg.engine.simulated.recording:
        return cfg.engine.simulated.max_num_seqs
    return int(cfg.engine.extra.get("max_num_seqs") or DEFAULT_SLACK)


def retriever_application(cfg: Config, tokenizer: TokenizerSpec):
    """The retrieval service as a Serve application (not yet running)."""
    from ray import serve

    from .retriever import IndexShardReplica, RetrieverReplica

    shards = [serve.deployment(IndexShardReplica, name=f"SelfRagIndexShard{i}")
              .options(**replica_options(cfg.retrieval.shard_service)).bind(cfg.retrieval, cfg.storage, name)
              for i, name in enumerate(apart_shards(cfg))]
    options = replica_options(cfg.retrieval.service)
    return serve.deployment(RetrieverReplica, name="SelfRagRetriever").options(**options).bind(
        cfg.retrieval, cfg.storage, shards, job_actor_name())


def apart_shards(cfg: Config) -> list[str]:
    """The shard files of the run's index version that get deployments of their own
    (``retrieval.shards_apart``); none otherwise."""
    if not cfg.retrieval.shards_apart:
        return []
    from ..retrieval.index import INDEX_FILE, read_meta

    return list(read_meta(Storage(cfg.storage), cfg.retrieval.index_dir).get("shards", [INDEX_FILE]))


class ServicesUnavailable(RuntimeError):
    """The services cannot run: the cluster lacks the resources they ask for, or they did not
    start in time. The message names what was asked and what the cluster has."""


def _bundles(svc: ServiceConfig, workers: int = 1) -> list[dict[str, float]]:
    """What one replica reserves: one bundle, or (tensor parallelism) a CPU bundle and a GPU bundle per worker."""
    if workers > 1:
        return [{"CPU": svc.num_cpus}] + [{"GPU": svc.num_gpus or 1.0}] * workers
    return [{"CPU": svc.num_cpus, "GPU": svc.num_gpus}]


def replica_demands(cfg: Config, retrieval: bool) -> list[tuple[str, list[dict[str, float]]]]:
    """(what, bundles) for every replica the job deploys and every stage actor it starts."""
    wanted = [("engine.service", cfg.engine.service, cfg.engine.tensor_parallel_size)]
    if retrieval:
        wanted.append(("retrieval.service", cfg.retrieval.service, 1))
        if not cfg.retrieval.service.deployment:
            wanted += [("retrieval.shard_service", cfg.retrieval.shard_service, 1)] * len(apart_shards(cfg))
    demands = [(name, _bundles(svc, workers)) for name, svc, workers in wanted if not svc.deployment
               for _ in range(svc.replicas)]
    for name, stage in stage_pools(cfg):  # as the dataflow builds them
        demands += [(f"stages.{name}", [{"CPU": stage.num_cpus}])] * stage.replicas
    return demands + [("stages.write", [{"CPU": cfg.stages.write.num_cpus}])]  # one writer sees every row


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:g}" for key, value in sorted(resources.items()) if value) or "nothing"


def check_resources(demands: list[tuple[str, list[dict[str, float]]]], nodes: list[dict[str, float]]) -> str | None:
    """Why the replicas and actors of ``demands`` cannot all be placed on ``nodes`` (each node's
    total resources), or None when they fit in sum and each bundle fits some node."""
    asked: dict[str, float] = {}
    for _, bundles in demands:
        for bundle in bundles:
            for key, value in bundle.items():
                asked[key] = asked.get(key, 0.0) + value
    have = cluster_total(nodes)
    short = [key for key, value in asked.items() if value > have.get(key, 0.0) + 1e-9]
    if short:
        return (f"the job asks for {_describe(asked)} (services and stage actors) but the cluster has "
                f"{_describe(have)}: lower the replicas or num_cpus/num_gpus of engine.service, retrieval.service "
                "or stages, or add nodes")
    for what, bundles in demands:
        for bundle in bundles:
            if not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()) for node in nodes):
                return (f"one {what} replica asks for {_describe(bundle)}, more than any node of the cluster has "
                        f"(the largest: {_describe(max(nodes, key=lambda n: (n.get('GPU', 0), n.get('CPU', 0))))})")
    return None


def cluster_total(nodes: list[dict[str, float]]) -> dict[str, float]:
    """CPU and GPU over ``nodes``."""
    return {key: sum(node.get(key, 0.0) for node in nodes) for key in ("CPU", "GPU")}


def cluster_nodes() -> list[dict[str, float]]:
    """The total resources of each live node of the connected Ray cluster."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def started_here() -> bool:
    """Whether this driver started the Ray it is connected to (a local Ray: nothing will join it)."""
    import ray._private.worker as worker

    node = getattr(worker, "_global_node", None)
    return bool(getattr(node, "head", False))


def wait_until_running(names: list[str], timeout_s: float, why_not: str,
                       cancelled: threading.Event | None = None) -> None:
    """Wait for the Serve applications ``names`` to run; ServicesUnavailable when one failed to
    deploy, or after ``timeout_s`` (``why_not``: what the cluster has, for the message). Returns
    without a further call to Ray once ``cancelled`` is set."""
    from ray import serve

    cancelled = cancelled or threading.Event()
    deadline, pause = time.monotonic() + timeout_s, 0.05
    while not cancelled.is_set():
        statuses = serve.status().applications
        failed = {n: statuses[n] for n in names if n in statuses and statuses[n].status == "DEPLOY_FAILED"}
        if failed:
            name, status = next(iter(failed.items()))
            message = " ".join(str(status.message).split())[:500]
            raise ServicesUnavailable(f"the Serve application {name} failed to deploy: {message}")
        if all(n in statuses and statuses[n].status == "RUNNING" for n in names):
            return
        if time.monotonic() > deadline:
            waiting = [n for n in names if n not in statuses or statuses[n].status != "RUNNING"]
            raise ServicesUnavailable(f"{', '.join(waiting)} not running {timeout_s:g} s after deployment "
                                      f"(start_timeout_s): {why_not}")
        cancelled.wait(pause)
        pause = min(1.0, pause * 2)


def controller_options(cfg: Config) -> dict:
    """The options of a Serve controller that this job starts (``serve.start`` ignores them for
    a running one): its control loop's period (``ray.serve_control_loop_s``)."""
    period = cfg.ray.serve_control_loop_s
    return {} if period is None else {"runtime_env": {"env_vars": {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": f"{period:g}"}}}


def start_services(cfg: Config, tokenizer: TokenizerSpec, retrieval: bool, wait: bool = True) -> Services:
    """Deploy (or find) the engine service, and the retrieval service when ``retrieval``; with
    ``wait``, wait until they run (``wait_for_services``; without, the caller starts its
    dataflow meanwhile and waits after). A request that the cluster cannot hold is refused
    before anything is deployed on a Ray this driver started (ServicesUnavailable); on a cluster
    that may grow, it is a warning, and ``start_timeout_s`` bounds the wait."""
    from ray import serve
    from ray.serve.api import RunTarget, run_many

    demands, nodes = replica_demands(cfg, retrieval), cluster_nodes()
    short = check_resources(demands, nodes)
    if short and started_here():
        raise ServicesUnavailable(f"refused before deploying: {short}")
    if short:
        log.warning("%s; waiting for the cluster to scale up (at most start_timeout_s)", short)
    serve.start(proxy_location="Disabled", controller_options=controller_options(cfg))
    services, targets = Services(), []
    wanted = [("engine", cfg.engine.service, ENGINE_APP, engine_application)]
    if retrieval:
        wanted.append(("retriever", cfg.retrieval.service, RETRIEVER_APP, retriever_application))
    running = set(serve.status().applications)
    for attr, svc, default_name, build in wanted:
        if svc.deployment:
            if svc.deployment not in running:
                raise ServicesUnavailable(f"{attr}.service.deployment: no running Serve application named "
                                          f"{svc.deployment!r} (running: {sorted(running)})")
            if attr == "retriever":
                check_reused_retriever(svc.deployment, cfg.retrieval.index_dir, Storage(cfg.storage))
            setattr(services, attr, svc.deployment)
            continue
        setattr(services, attr, default_name)
        services.owned.append(default_name)
        targets.append(RunTarget(target=build(cfg, tokenizer), name=default_name, route_prefix=None))
    if targets:
        services.start_timeout_s = max(svc.start_timeout_s for _, svc, _, _ in wanted if not svc.deployment)
        services.why_not = short or (f"the cluster has {_describe(cluster_total(nodes))}; the run log has Serve's "
                                     "view (pending resource demands, replica errors)")
        try:
            run_many(targets, wait_for_applications_running=False)
            phases.reached("deploy")  # test hook: the applications are deploying
        except BaseException:  # a signal: no application of this job stays behind
            stop_services(services)
            raise
    if wait:
        wait_for_services(services)
    return services


def wait_for_engine_start(services: Services, metrics) -> None:
    """Until the first engine replica the job deployed reports (to ``metrics``, the job's
    metrics actor) that it is starting: the stage actors the job starts next then start beside
    its model load, not before it in the raylet's queue of worker processes to start. Returns at
    once for a reused engine, and when the application failed, runs, or ``start_timeout_s``
    passed (``wait_for_services`` then says why)."""
    if services.engine not in services.owned:
        return
    import ray
    from ray import serve

    deadline, polls = time.monotonic() + services.start_timeout_s, 0
    while time.monotonic() < deadline:
        try:
            if "starting_at" in ray.get(metrics.get.remote(), timeout=30).get("engine", {}):
                return
        except Exception:  # noqa: BLE001 - no metrics: start the stages now
            return
        polls += 1
        if polls % 8 == 0:
            status = serve.status().applications.get(services.engine)
            if status is None or status.status in ("DEPLOY_FAILED", "RUNNING"):
                return
        time.sleep(0.25)


@contextmanager
def services_awaited_beside(services: Services):
    """Run the body (the dataflow, in the main thread) while another thread waits for the
    services the job deployed: if they fail to start, the main thread is stopped (through
    SIGUSR1's handler, ``main_stop``) and ServicesUnavailable leaves the body. Outside the main
    thread: wait first, then run the body."""
    if threading.current_thread() is not threading.main_thread():
        wait_for_services(services)
        yield
        return
    failure: list[BaseException] = []
    finished = threading.Event()

    def raise_failure(_signum, _frame):
        main_stop.stop(failure[0])  # a KeyboardInterrupt: also inside a Ray call (main_stop)

    def watch() -> None:
        try:
            wait_until_running(services.owned, services.start_timeout_s, services.why_not, finished)
        except Exception as exc:  # noqa: BLE001 - whatever stops the wait stops the job
            if not finished.is_set():
                failure.append(exc)
                _thread.interrupt_main(signal.SIGUSR1)

    watcher = threading.Thread(target=watch, name=WATCH_THREAD, daemon=True)
    previous = signal.signal(signal.SIGUSR1, raise_failure)
    try:
        if services.owned:
            watcher.start()
        yield
    except KeyboardInterrupt as exc:
        if failure and main_stop.reason(exc) is failure[0]:
            raise failure[0] from None
        raise
    finally:
        finished.set()
        # The watcher ends with the body: left polling, it would outlive the job's Ray, and
        # Serve's next call would start a new local Ray in this process (Serve connects on demand).
        if watcher.is_alive():
            watcher.join(timeout=WATCH_JOIN_S)
        signal.signal(signal.SIGUSR1, previous)


def wait_for_services(services: Services) -> None:
    """Wait until the applications the job deployed run; ServicesUnavailable (and they are
    removed) when one failed to deploy or ``start_timeout_s`` passed."""
    if not services.owned:
        return
    try:
        wait_until_running(services.owned, services.start_timeout_s, services.why_not)
    except BaseException:  # the timeout, or a signal: no application of this job stays behind
        stop_services(services)
        raise


def check_reused_retriever(app: str, version: str, storage: Storage) -> None:
    """A running retrieval service that the job reuses searches the index version the run
    resolved (``version``, read with ``storage``, which its annotation identity names), or the
    job is refused."""
    from ray import serve

    from ..retrieval.index import read_meta

    try:
        loaded = serve.get_app_handle(app).index_meta.remote().result(timeout_s=120)
    except Exception as exc:  # noqa: BLE001 - e.g. a service of an older version without index_meta
        raise RuntimeError(f"retrieval.service.deployment {app!r}: cannot tell which index version it searches "
                           f"({type(exc).__name__}); redeploy it from this version of the pipeline") from None
    wanted = read_meta(storage, version)
    if loaded != wanted:
        raise RuntimeError(f"retrieval.service.deployment {app!r} searches the index version "
                           f"{loaded.get('version') or '(unnamed)'}, but this run resolved {version}: deploy the "
                           "service on that version, or set retrieval.index_dir to the version it searches")


def stop_services(services: Services, timeout_s: float = 120.0) -> None:
    """Delete the applications this job deployed (reused ones keep running), all at once, and
    wait until they are gone: their replicas have shut down, and sent their last metrics."""
    from ray import serve

    deleting = []
    for name in services.owned:
        try:
            serve.delete(name, _blocking=False)
            deleting.append(name)
        except Exception as exc:  # noqa: BLE001 - the run's outcome is decided; say it and go on
            log.warning("could not delete Serve application %s: %s", name, exc)
    deadline = time.monotonic() + timeout_s
    while deleting and time.monotonic() < deadline:
        try:
            running = serve.status().applications
        except Exception as exc:  # noqa: BLE001 - as above
            log.warning("could not follow the deletion of Serve applications %s: %s", deleting, exc)
            return
        deleting = [name for name in deleting if name in running]
        if deleting:
            time.sleep(0.1)
    if deleting:
        log.warning("Serve applications %s were still shutting down after %.0f s", deleting, timeout_s)
