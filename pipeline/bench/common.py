"""What the benchmarks share: their working directory, the annotation job run on a workload,
fresh processes timed end to end, and the figures printed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .workload import write_shards

BENCH_DIR = Path("outputs/bench")
#: The engine requests and outputs ``make bench`` records (``make bench-scale`` replays them).
RECORDING = BENCH_DIR / "engine-requests"
#: Roles of the CPU account that are the engine (vLLM's processes and the replica in front of
#: them).
ENGINE_ROLES = ("engine_replica", "engine_core", "engine_worker")
RAY = str(Path(sys.executable).parent / "ray")  # the command line of this environment's Ray
#: Roles that are not the harness either: the engine's, and processes that are not the job's
#: ("other": whatever else runs on the machine).
NOT_HARNESS = (*ENGINE_ROLES, "other")


def harness_cores(cores: dict[str, float]) -> float:
    """The mean cores of the harness (every role of the job but the engine's) in a CPU account."""
    return sum(v for role, v in cores.items() if role not in NOT_HARNESS)


def annotate(name: str, rows: list[dict], shards: int, overrides: list[str]) -> tuple[dict, list[dict]]:
    """Run the annotation job on ``rows`` (in this process, under ``BENCH_DIR/name``); returns
    (manifest, output rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from ..infra.config import load_config
    from ..run.annotate import run

    write_shards(BENCH_DIR / name / "queries", rows, shards)
    out = BENCH_DIR / name / "out"
    shutil.rmtree(out, ignore_errors=True)  # an earlier run of other shards left their parts (overwrite redoes this input's)
    cfg = load_config([], [f"input.paths=[{BENCH_DIR / name / 'queries'}]", f"output.path={out}",
                           "ray.progress_bars=false", "output.overwrite=true", *overrides])
    manifest = run(cfg)
    table = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))])
    ray.shutdown()  # the next step gets the whole machine
    return manifest, table.to_pylist()


def timed(command: list[str], log: Path) -> float:
    """Seconds a fresh process takes to run ``command`` (its output to ``log``); it must succeed."""
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=fresh_env()).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {code}; see {log}")
    return time.perf_counter() - start


def fresh_env() -> dict:
    """This environment without a Ray address (each process starts or names its own)."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def free_port() -> int:
    """A TCP port free on this machine now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def print_figures(title: str, result: dict) -> None:
    """A benchmark's figures, one per line, then the same as one JSON object on the last line."""
    print(f"\n{title}:")
    for key, value in result.items():
        print(f"  {key:32s} {value}")
    print(json.dumps(result), flush=True)
