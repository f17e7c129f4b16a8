"""When the run reached each of its phases, for the manifest's ``phases``.

``mark(name)`` records the wall-clock time a phase ended (the driver's own phases); ``relative()``
gives every recorded phase in seconds since the process started (its creation time, so that
``imports`` counts the interpreter's start and the imports before ``main``), in the order
``PHASES`` names them. Phases the run did not pass (a run with nothing to do has no engine
requests; a run called in-process has no ``imports``) are absent.
"""

from __future__ import annotations

import time

#: In the order a run passes them: imports done (``main`` entered), preflight done, Ray
#: connected, services ready (the first engine replica the job started, from the engine's
#: metrics; the stages started meanwhile), first and last engine request (from the engine's metrics), last
#: shard committed, and the manifest written (what follows: the report, the summary, exit).
PHASES = ("imports", "preflight", "ray_init", "services_ready", "first_request", "last_request", "committed", "exit")
_marks: dict[str, float] = {}


def mark(name: str, at: float | None = None) -> None:
    """Record that the run reached phase ``name`` now (or at the epoch time ``at``)."""
    assert name in PHASES, name
    _marks[name] = time.time() if at is None else at


def start_run() -> None:
    """Forget the phases of an earlier run in this process (all but ``imports``)."""
    for name in [n for n in _marks if n != "imports"]:
        del _marks[name]


def process_start() -> float:
    """The epoch time this process was created."""
    import psutil

    return psutil.Process().create_time()


def relative() -> dict[str, float]:
    """The phases recorded, in seconds since the process started, in run order."""
    start = process_start()
    return {name: round(_marks[name] - start, 2) for name in PHASES if name in _marks}
