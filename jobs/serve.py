"""Start the engine and retrieval services on a Ray cluster and leave them running, or stop them.

    python -m jobs.serve [--config FILE ...] [key=value ...]     # deploy, wait until running, exit
    python -m jobs.serve --stop [key=value ...]                   # delete them

It leaves them warm: Ray Data's cluster-wide actors started and each service called a few
times (``pipeline.services.warm_up``), so that the first job pays no more than the next ones.
Jobs on the same cluster then reuse them, with no engine start-up of their own:
``engine.service.deployment=selfrag-engine retrieval.service.deployment=selfrag-retriever``
(and the same ``ray.address``, or ``RAY_ADDRESS``). Use the same config as the jobs (model,
engine settings, index): a job refuses a retrieval service that searches another index version.
The services need a running cluster (``ray start --head``, or ``ray.address``): this command
refuses to start a local Ray of its own, whose services would end with it.
"""

from __future__ import annotations

import argparse

from pipeline.infra.config import ConfigError, load_config
from pipeline.infra.io import Storage
from pipeline.infra.console import print_error
from pipeline.run.preflight import PreflightError, check_model, ensure_index
from pipeline.runtime.ray_connect import init_ray, stop_ray
from pipeline.run.exit_codes import end_job
from pipeline.services.deploy import (ENGINE_APP, RETRIEVER_APP, Services, ServicesUnavailable, start_services,
                                      started_here, stop_services)
from pipeline.model.tokenizer import tokenizer_spec
from pipeline.services.warm_up import warm_up
from pipeline.runtime.process_exit import exit_process


def main(argv: list[str] | None = None) -> int:
    """Entrypoint: returns the exit code (2: refused; 1: the services did not start)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML preset (repeatable)")
    parser.add_argument("--stop", action="store_true", help="delete the running services instead")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        storage = Storage(cfg.storage)
        retrieval = cfg.selfrag.mode != "never"
        if not args.stop:
            check_model(cfg, storage)
            ensure_index(cfg, storage)  # the services search the version the location names now
    except (ConfigError, PreflightError) as exc:
        return end_job(exc)
    init_ray(cfg.ray.address, dashboard=cfg.ray.dashboard)
    try:
        if started_here():
            print_error("no Ray cluster to keep the services on: start one (ray start --head) or set ray.address; "
                        "services of a Ray this command started would end with it")
            return 2
        from ray import serve

        if args.stop:
            running = set(serve.status().applications)
            stop_services(Services(owned=[a for a in (ENGINE_APP, RETRIEVER_APP) if a in running]))
            print(f"stopped: {sorted(running & {ENGINE_APP, RETRIEVER_APP}) or 'nothing was running'}", flush=True)
            return 0
        tokenizer = tokenizer_spec(storage, cfg.engine.model)
        try:
            services = start_services(cfg, tokenizer, retrieval=retrieval)
        except ServicesUnavailable as exc:
            return end_job(exc)
        print(f"warmed up in {warm_up(cfg, services, tokenizer):.1f} s (Ray Data's cluster-wide actors, a few "
              "calls to each service)", flush=True)
        print(f"running: {', '.join(services.owned)}. Jobs reuse them with engine.service.deployment={ENGINE_APP}"
              + (f" retrieval.service.deployment={RETRIEVER_APP}" if retrieval else "")
              + "; stop them with python -m jobs.serve --stop", flush=True)
        return 0
    finally:
        stop_ray()


if __name__ == "__main__":
    exit_process(main())
