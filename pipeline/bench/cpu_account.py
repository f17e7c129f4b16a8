"""Where a machine's CPU goes during a benchmark: every process's CPU time, sampled from
``/proc`` once a second and summed by role (engine worker, engine core, the engine replica's
front end, retriever, stage actors, Ray, the driver; the account's own sampling is ``other``).
Linux only; elsewhere it records nothing.

    account = CpuAccount(); account.start()
    ...  # the work
    account.stop(); account.cores(t0, t1)  # {role: mean cores used between t0 and t1}
"""

from __future__ import annotations

import os
import threading
import time

#: (substring of a process's title or command line, role); the first match wins. vLLM and Ray
#: retitle their processes (``VLLM::EngineCore``, ``ray::MapWorker(MapBatches(CritiqueStage))``).
ROLES = (
    ("VLLM::Worker", "engine_worker"), ("VllmWorker", "engine_worker"),
    ("EngineCore", "engine_core"),
    ("ServeReplica:selfrag-engine", "engine_replica"),
    ("ServeReplica:selfrag-retriever", "retriever"),
    ("ChainStage", "chain"), ("FirstPassStage", "first_pass"), ("RetrieveStage", "retrieve"), ("CritiqueStage", "critique"),
    ("ShardWriter", "write"),
    ("ServeController", "ray_serve_controller"),
    ("ray::", "ray_other"), ("/ray/", "ray_other"), ("ray-dashboard", "ray_other"),
)
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _role(pid: str, driver: str) -> str | None:
    if pid == driver:
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/comm") as f:
            title += " " + f.read()
    except OSError:
        return None
    return next((role for key, role in ROLES if key in title), "other")


def _cpu_seconds(pid: str) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


class CpuAccount:
    """A background thread summing every process's CPU time by role (see the module docstring)."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[str, float]]] = []  # (time, CPU seconds by role since the last sample)
        self._last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="cpu-account")
        self._driver = str(os.getpid())
        #: CPU seconds the sampling thread has taken (counted as ``other``, not as the driver's).
        self.own_seconds = 0.0

    def start(self) -> "CpuAccount":
        """Start sampling (no-op without ``/proc``)."""
        if os.path.isdir("/proc/self"):
            self._sample()
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        mark = time.thread_time()
        while not self._stop.wait(self.interval_s):
            now = time.thread_time()
            self._sample(own=now - mark)
            mark = now

    def _sample(self, own: float = 0.0) -> None:
        """One sample; ``own``: this thread's CPU since the last one (reading ``/proc``), which
        the driver's process time includes: it is counted as ``other``, not as the driver's."""
        now, used, seen = time.time(), {}, {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or (seconds := _cpu_seconds(pid)) is None:
                continue
            seen[pid] = seconds
            if pid in self._last and (role := _role(pid, self._driver)) is not None:
                used[role] = used.get(role, 0.0) + seconds - self._last[pid]
        own = min(own, used.get("driver", 0.0))  # /proc counts in ticks: a quiet driver may show less
        if own > 0:
            used["driver"] -= own
            used["other"] = used.get("other", 0.0) + own
            self.own_seconds += own
        self._last = seen
        self.samples.append((now, used))

    def cores(self, t0: float, t1: float) -> dict[str, float]:
        """Mean cores each role used between epoch times ``t0`` and ``t1``, largest first."""
        total: dict[str, float] = {}
        for t, used in self.samples:
            if t0 < t <= t1:
                for role, seconds in used.items():
                    total[role] = total.get(role, 0.0) + seconds
        span = max(t1 - t0, 1e-9)
        return {role: round(s / span, 2) for role, s in sorted(total.items(), key=lambda kv: -kv[1]) if s / span >= 0.005}
