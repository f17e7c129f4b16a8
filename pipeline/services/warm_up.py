"""Services left running between jobs, ready for the first job that reuses them.

The first job on a cluster pays for what later jobs find running: Ray Data's cluster-wide
actors (its statistics, autoscaling and actor-location actors: one worker process each), and
each engine replica's first requests (vLLM's first calls of a shape are slower). Measured on 2
cores with a 120-row job: 18.3 s for the first job after the services started, 9.4 to 10.2 s
for the next ones. ``warm_up`` pays it once, when the services are deployed to be kept
(``jobs.serve``), with calls that leave nothing in the engine's prefix cache that a job's
prompts would share.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..infra.config import Config
from ..infra.io import Storage
from ..model.tokenizer import TokenizerSpec, spec_tokens
from .clients import ROUTE
from .deploy import Services

log = logging.getLogger(__name__)

#: Calls per engine replica (each with its own routing key, so that the router spreads them).
CALLS_PER_REPLICA = 4


def warm_up(cfg: Config, services: Services, tokenizer: TokenizerSpec) -> float:
    """Start Ray Data's cluster-wide actors and send each service a few small calls; returns
    the seconds it took. A failure is logged, never raised: the services run either way."""
    start = time.perf_counter()
    try:
        start_ray_data_actors()
        asyncio.run(call_services(cfg, services, tokenizer))
    except Exception as exc:  # noqa: BLE001 - warming is an optimisation
        log.warning("warming the services up failed (%s: %s); the first job will start slower",
                    type(exc).__name__, exc)
    return time.perf_counter() - start


def start_ray_data_actors() -> None:
    """Run a one-row dataset through a one-actor pool: Ray Data starts its cluster-wide actors,
    which outlive this driver and serve every later job's datasets. It asks for no CPU (the
    services may hold every CPU of the cluster), and ``from_items`` runs no read task."""
    import ray

    class Same:
        def __call__(self, batch):
            return batch

    ray.data.from_items([{"x": 0}]).map_batches(Same, compute=ray.data.ActorPoolStrategy(size=1),
                                                num_cpus=0).materialize()


async def call_services(cfg: Config, services: Services, tokenizer: TokenizerSpec) -> None:
    """A few short generations per engine replica, and one search of the retriever."""
    from ray import serve

    calls = []
    if services.engine:
        tokens, _, _ = spec_tokens(Storage(cfg.storage), tokenizer)
        prompt = tokens.bos + tokens.text("Warm-up.")
        engine = serve.get_app_handle(services.engine)
        calls += [engine.generate.remote({ROUTE: f"warm-up-{i}", "prompts": [prompt], "max_tokens": [4]})
                  for i in range(CALLS_PER_REPLICA * cfg.engine.service.replicas)]
    if services.retriever:
        calls.append(serve.get_app_handle(services.retriever).search.remote(["warm-up"], 1))
    await asyncio.gather(*calls)
