"""The phases of a run a signal may arrive in, and a test hook that holds a process in one.

``SELFRAG_TEST_PAUSE_AT=<phase>`` makes the process that reaches that phase (the driver, or a
worker of the local Ray the driver starts: the variable is inherited) say so, on its standard
output and, when ``SELFRAG_TEST_PAUSED_FILE`` names a file, by appending ``<phase> <pid>`` to
it, and then wait there. A test signals the driver once the phase is announced, so which phase
the signal hits does not depend on the machine's speed. Unset (as outside tests), ``reached``
costs one environment look-up.
"""

from __future__ import annotations

import os
import time

PAUSE_AT, PAUSED_FILE = "SELFRAG_TEST_PAUSE_AT", "SELFRAG_TEST_PAUSED_FILE"
#: In the order a run passes them: the driver before ``ray.init``; inside ``ray.init`` (the
#: local Ray's raylet started, its agents starting); the driver while the services deploy; an
#: engine replica starting, before it loads its model (held there, it never runs); a
#: first-pass actor on its first batch; the writer between writing a shard's hidden file and
#: moving it into place.
PHASES = ("before_ray_init", "ray_init", "deploy", "engine_start", "first_batch", "commit")
MAX_PAUSE_S = 900.0


def armed(phase: str) -> bool:
    """Whether the test hook holds processes at ``phase``."""
    assert phase in PHASES, phase
    return os.environ.get(PAUSE_AT) == phase


def reached(phase: str) -> None:
    """Test hook: when armed for ``phase``, announce it and wait (at most ``MAX_PAUSE_S``); a
    signal handler's exception ends the wait."""
    if not armed(phase):
        return
    print(f"test hook: paused at {phase} (pid {os.getpid()})", flush=True)
    path = os.environ.get(PAUSED_FILE)
    if path:
        with open(path, "a") as f:
            f.write(f"{phase} {os.getpid()}\n")
    deadline = time.monotonic() + MAX_PAUSE_S
    while time.monotonic() < deadline:
        time.sleep(0.1)
