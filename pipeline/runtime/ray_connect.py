"""Connecting a job's driver to Ray: the configured address, ``RAY_ADDRESS``, a Ray already
running on this machine, or a new local one.

Ray on its own follows the address file of the last ``ray start`` on this machine
(``/tmp/ray/ray_current_cluster``) even when that cluster is gone (killed, or the machine was
restored from a snapshot), and then retries its GCS for ever. A job here checks the file first
and starts a new local Ray, with a warning, when the address in it does not answer.

Stopping: ``stop_ray`` ends the driver's Ray and then every process of a local Ray this driver
started that is still running. The processes ``ray.init`` starts (GCS, raylet, dashboard, ...)
are the driver's children and are SIGKILLed when it exits (Ray sets their parent-death signal),
but Ray's two per-node agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) are the
raylet's children, and a raylet killed that way cannot stop them: they wait for their gone GCS
for one to two minutes before they exit. That is what a signal inside ``ray.init`` left behind
(Ray had not recorded its processes yet and the driver was not connected, so the job called no
``ray.shutdown`` and nothing stopped them), and what a driver killed by SIGKILL leaves:
``init_ray`` ends such leftovers of earlier runs before it starts a local Ray.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from . import phases

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 2.0
#: Seconds the processes of a local Ray get between SIGTERM and SIGKILL when ``stop_ray`` ends them.
STOP_GRACE_S = 3.0
#: The titles of Ray's per-node agents (children of the raylet).
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
PR_SET_CHILD_SUBREAPER = 36  # Linux prctl

#: This process's children (pid, start time) before ``init_ray`` called ``ray.init``: the children
#: that are not among them (and their descendants) are the processes of a local Ray it started.
_children_before: set[tuple[int, float]] | None = None


def address_file() -> str:
    """Path of Ray's current-cluster file on this machine (honours ``RAY_TMPDIR``/``TMPDIR``)."""
    try:
        from ray._common.utils import get_ray_address_file
        return get_ray_address_file(None)
    except ImportError:  # layout of other Ray versions
        base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
        return os.path.join(base, "ray", "ray_current_cluster")


def answers(address: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    host, _, port = address.strip().rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def resolve_address(address: str | None) -> str | None:
    """The address to hand to ``ray.init``: ``address`` when set; ``None`` (Ray's own lookup)
    when ``RAY_ADDRESS`` is set, or when no cluster file exists, or when the cluster it names
    answers; ``"local"`` (a new local Ray) when the file names a cluster that does not answer."""
    if address or os.environ.get("RAY_ADDRESS"):
        return address
    path = address_file()
    try:
        with open(path) as f:
            recorded = f.read().strip()
    except OSError:
        return None
    if not recorded or answers(recorded):
        return None
    log.warning("%s names a Ray cluster at %s that does not answer (gone); starting a new local Ray. "
                "Set ray.address to use a cluster, or delete that file to silence this.", path, recorded)
    return "local"


def would_start_local_ray(address: str | None) -> bool:
    """Whether ``init_ray(address)`` would start a new local Ray: this process is not connected,
    no address is configured or in ``RAY_ADDRESS``, and no Ray that answers runs on this machine."""
    ray = sys.modules.get("ray")  # not imported: not connected
    if (ray is not None and ray.is_initialized()) or address or os.environ.get("RAY_ADDRESS"):
        return False
    try:
        with open(address_file()) as f:
            recorded = f.read().strip()
    except OSError:
        return True
    return not recorded or not answers(recorded)


def init_ray(address: str | None, configure_logging: bool = True, dashboard: bool = False) -> None:
    """``ray.init`` on the resolved address (nothing when this process is already connected);
    ``configure_logging=False`` leaves the driver's logging to the caller (no console handler of
    Ray's); ``dashboard``: a new local Ray starts its dashboard (``ray.dashboard``; a cluster's
    is the cluster's)."""
    import ray

    global _children_before
    if ray.is_initialized():
        return
    resolved = resolve_address(address)
    local = resolved == "local" or (resolved is None and not os.environ.get("RAY_ADDRESS")
                                    and not os.path.exists(address_file()))
    if local:  # a new local Ray: no leftovers in its way
        end_orphaned_agents()
    _children_before = {key for key in map(_key, _psutil().Process().children()) if key}
    if phases.armed("ray_init"):
        _hold_in_ray_init()
    ray.init(address=resolved, ignore_reinit_error=True, logging_level=logging.WARNING,
             configure_logging=configure_logging,
             **({"include_dashboard": dashboard} if local or would_start_local_ray(address) else {}))
    no_auto_connect()


def no_auto_connect() -> None:
    """From now on nothing in this process starts a Ray on its own: this driver connects through
    ``init_ray`` only. Ray's public calls start a local Ray when none is connected, and a library
    thread that outlives a run's Ray would do so after its ``ray.shutdown`` (Ray Serve's handles
    keep a long-poll callback that calls the gone controller: a driver running several jobs then
    met a Ray nobody started, "ray.init twice"). Such a call fails instead."""
    from ray._private import auto_init_hook  # read once at import from RAY_ENABLE_AUTO_CONNECT

    auto_init_hook.enable_auto_connect = False


def stop_ray(grace_s: float = STOP_GRACE_S) -> None:
    """Stop this driver's Ray, whatever it was doing: ``ray.shutdown()`` (on a cluster this ends the
    job's connection, and its actors with it), then every process of a local Ray this driver
    started that is still running gets SIGTERM, and SIGKILL after ``grace_s`` seconds: the
    processes of a ``ray.init`` interrupted before Ray knew them, and agents the raylet could not
    stop. On Linux the driver adopts the orphans of those processes meanwhile, so none escapes.
    Never raises; nothing to do when Ray was never started."""
    global _children_before
    adopting = _children_before is not None and _subreaper(True)
    try:
        left = local_ray_processes()
        _ray_shutdown()
        for _ in range(3):  # then the orphans adopted meanwhile, and children started in between
            _reap()
            left = {p.pid: p for p in [*left, *local_ray_processes()] if _running(p)}.values()
            if not left:
                break
            end_processes(list(left), grace_s)
            left = []
        _reap()
    finally:
        if adopting:
            _subreaper(False)
        _children_before = None


def _ray_shutdown() -> None:
    """``ray.shutdown()`` when this process is connected to Ray, or was connecting when stopped."""
    if "ray" not in sys.modules:
        return
    import ray
    import ray._private.worker as worker

    if ray.is_initialized() or getattr(worker, "_global_node", None) is not None:
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - what it did not stop, stop_ray ends
            log.info("ray.shutdown failed", exc_info=True)


def local_ray_processes() -> list:
    """The processes of the local Ray that ``init_ray`` started in this process (its children
    since then, and their descendants; none for a Ray it joined), as ``psutil.Process``."""
    if _children_before is None:
        return []
    psutil = _psutil()
    found = {}
    for child in psutil.Process().children():
        if _key(child) in _children_before:
            continue
        found[child.pid] = child
        try:
            found.update((p.pid, p) for p in child.children(recursive=True))
        except psutil.Error:
            pass
    return list(found.values())


def end_processes(procs: list, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM ``procs`` (``psutil.Process``), SIGKILL those alive ``grace_s`` seconds later;
    children of this process among them are reaped."""
    psutil = _psutil()
    for sig in ("terminate", "kill"):
        for proc in procs:
            try:
                getattr(proc, sig)()
            except psutil.Error:
                pass
        _, procs = psutil.wait_procs(procs, timeout=grace_s)
        if not procs:
            return
    log.warning("could not end process(es) %s", [p.pid for p in procs])


def end_orphaned_agents(grace_s: float = STOP_GRACE_S) -> list[int]:
    """End this user's Ray agents whose raylet is gone (what a local Ray whose driver was killed
    leaves for a minute or two: they hold the agent's port, memory and some CPU meanwhile);
    returns their pids. A Ray that runs keeps its agents: their parent is its raylet."""
    psutil = _psutil()
    uid = os.getuid() if hasattr(os, "getuid") else None
    orphans = []
    for proc in psutil.process_iter(["cmdline", "ppid", "uids"]):
        try:
            cmdline, uids = proc.info["cmdline"] or [""], proc.info["uids"]
            if not cmdline[0].startswith(AGENTS) or (uid is not None and uids is not None and uids.real != uid):
                continue
            if not _is_raylet(proc.info["ppid"]):
                orphans.append(proc)
        except psutil.Error:
            continue
    if orphans:
        log.warning("ending %d Ray agent process(es) whose raylet is gone (left by a local Ray whose driver was "
                    "killed): pids %s", len(orphans), [p.pid for p in orphans])
        end_processes(orphans, grace_s)
    return [p.pid for p in orphans]


def _is_raylet(pid: int) -> bool:
    """Whether ``pid`` is a raylet, or runs one (Ray's valgrind, perf, gdb or tmux options wrap it)."""
    psutil = _psutil()
    try:
        proc = psutil.Process(pid)
        return proc.name() == "raylet" or any("raylet" in os.path.basename(part) for part in proc.cmdline())
    except psutil.Error:
        return False


def _hold_in_ray_init() -> None:
    """Test hook (phase ``ray_init``): ``ray.init`` waits once the local Ray's raylet is started."""
    from ray._private.node import Node

    start = Node.start_raylet
    if getattr(start, "held", False):
        return

    def start_raylet(self, *args, **kwargs):
        start(self, *args, **kwargs)
        phases.reached("ray_init")

    start_raylet.held = True
    Node.start_raylet = start_raylet


def _subreaper(on: bool) -> bool:
    """Linux: while on, orphans of this process's descendants become its children (not init's)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _reap() -> None:
    """Collect the exit status of this process's children of the local Ray that have ended."""
    psutil = _psutil()
    for proc in local_ray_processes():
        try:
            if proc.ppid() == os.getpid() and not _running(proc):
                os.waitpid(proc.pid, os.WNOHANG)
        except (ChildProcessError, psutil.Error):
            pass


def _key(proc) -> tuple[int, float] | None:
    try:
        return proc.pid, proc.create_time()
    except _psutil().Error:
        return None


def _running(proc) -> bool:
    psutil = _psutil()
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _psutil():
    import psutil  # installed with Ray

    return psutil
