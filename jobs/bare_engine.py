"""The plain script the pipeline competes with on small jobs: load vLLM, generate, exit.

    python -m jobs.bare_engine REQUESTS_DIR [key=value ...]

Imports vLLM, loads the configured model, runs the engine requests recorded under
``REQUESTS_DIR`` (``debug.record_engine_requests`` of a pipeline run) as one batched
``generate`` call, and exits. ``make bench`` times this whole process
(``bare_engine_process_seconds``) against a fresh pipeline process on the same rows.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entrypoint: prints the requests and generated tokens; returns 0."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    from pipeline.infra.config import load_config
    from pipeline.model.vllm_engine import Engine
    from pipeline.services.recording import read_records

    cfg = load_config([], args[1:])
    requests = read_records(args[0])
    engine = Engine(cfg.engine)
    tokens = sum(len(out.outputs[0].token_ids) for out in engine.replay(requests))
    engine.shutdown()
    print(f"{len(requests)} requests, {tokens} generated tokens", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
