"""Connecting a job's driver to Ray: the configured address, ``RAY_ADDRESS``, a Ray already
running on this machine, or a new local one.

Ray on its own follows the address file of the last ``ray start`` on this machine
(``/tmp/ray/ray_current_cluster``) even when that cluster is gone (killed, or the machine was
restored from a snapshot), and then retries its GCS for ever. A job here checks the file first
and starts a new local Ray, with a warning, when the address in it does not answer.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 2.0


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


def init_ray(address: str | None, configure_logging: bool = True) -> None:
    """``ray.init`` on the resolved address (nothing when this process is already connected);
    ``configure_logging=False`` leaves the driver's logging to the caller (no console handler of Ray's)."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=resolve_address(address), ignore_reinit_error=True, logging_level=logging.WARNING,
             configure_logging=configure_logging)
