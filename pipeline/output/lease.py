"""One run per output: a lease on an output location (local or ``s3://``), kept alive by a
heartbeat. Records are ``{output}/_lease/{generation:010d}.json``; the highest generation is
the current lease. A new generation is only ever created with an exclusive create (``O_EXCL``
on local disk, ``If-None-Match: *`` on S3), so of several runs taking over the same lease
exactly one wins; each run only ever rewrites its own generation.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
from datetime import datetime, timezone

from ..infra.io import join, replacing
from .folder import OutputFolder

log = logging.getLogger(__name__)
_RECORD = re.compile(r"^(\d{10})\.json$")


class LeaseHeld(RuntimeError):
    """Another live run holds the output's lease; the message names the holder and says how to proceed."""

    def __init__(self, output: str, holder: dict, stale_after_s: float):
        self.holder = holder
        age = time.time() - holder["heartbeat_at"] if holder.get("heartbeat_at") else None
        super().__init__(
            f"output {output} is in use by another run: run id {holder.get('run_id', 'unknown')}, "
            f"owner {holder.get('owner', 'unknown')}, host {holder.get('host', 'unknown')}, "
            f"pid {holder.get('pid', 'unknown')}, started at {holder.get('started_at', 'unknown')}, "
            f"last heartbeat {'unknown' if age is None else f'{age:.0f}'} s ago. Wait for it to finish, "
            f"or retry once it is stale (no heartbeat for {stale_after_s:g} s).")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in the environment (containers)
        return "unknown"


def _generations(fs, root: str) -> list[int]:
    fs.invalidate_cache(root)  # s3fs caches listings: a cached one would hide newer generations
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in (_RECORD.match(posixpath.basename(n)) for n in names) if m)


def _read(fs, path: str) -> dict:
    """A lease record. A malformed one (partly written) is held by "unknown", its heartbeat the
    object's modification time: it becomes stale like any other, never sooner."""
    try:
        record = json.loads(fs.cat_file(path))
        if isinstance(record, dict) and isinstance(record.get("heartbeat_at"), (int, float)):
            return record
        heartbeat = fs.modified(path).timestamp()
    except FileNotFoundError:  # its creator's S3 write has not completed (we got 409 ConditionalRequestConflict)
        heartbeat = time.time()
    except (ValueError, UnicodeDecodeError):
        heartbeat = fs.modified(path).timestamp()
    return {"owner": "unknown", "host": "unknown", "pid": "unknown", "run_id": "unknown", "released": False,
            "heartbeat_at": heartbeat}


def _read_settled(fs, path: str, wait_s: float = 1.0) -> dict:
    """``_read``, giving a malformed record a moment: on local disk an exclusively created
    record exists, empty, until its creator has written it."""
    deadline = time.time() + wait_s
    while (record := _read(fs, path))["run_id"] == "unknown" and time.time() < deadline:
        time.sleep(0.05)
    return record


def process_namespace() -> str | None:
    """Where this process's pid means something: the boot and the pid namespace (Linux), or None.
    Containers that share a host name (host networking) have pid namespaces of their own, and a
    pid recorded before a reboot names nobody: a holder's pid is only looked up in the same one."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _takeable(record: dict, stale_after_s: float) -> bool:
    if record.get("released") or time.time() - record["heartbeat_at"] > stale_after_s:
        return True
    here = process_namespace()
    if (here is not None and record.get("pid_namespace") == here and record.get("host") == socket.gethostname()
            and isinstance(record.get("pid"), int)):
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's process
            pass
    return False


def _lost_race(exc: Exception) -> bool:
    # Real S3 answers 409 ConditionalRequestConflict to a conditional write racing another one.
    code = getattr(exc.__cause__, "response", {}).get("Error", {}).get("Code")
    return isinstance(exc, FileExistsError) or code in ("PreconditionFailed", "ConditionalRequestConflict")


class Lease:
    """A run's lease on an output location (local or s3://)."""

    def __init__(self, output: OutputFolder, holder: dict, heartbeat_s: float):
        self.output, self.holder = output, holder
        self._fs, self._root = output.storage.filesystem(output.lease_dir)
        self._path = join(self._root, f"{holder['generation']:010d}.json")
        self._lost, self._stop, self._lock = False, threading.Event(), threading.Lock()
        self._thread = threading.Thread(target=self._beat_loop, args=(heartbeat_s,), daemon=True,
                                        name=f"lease-heartbeat-{holder['run_id']}")

    @classmethod
    def acquire(cls, output: OutputFolder, run_id: str, stale_after_s: float = 600.0,
                heartbeat_s: float = 30.0) -> "Lease":
        """Take the lease on ``output`` or raise LeaseHeld. Starts a daemon heartbeat thread."""
        fs, root = output.storage.filesystem(output.lease_dir)
        generations = _generations(fs, root)
        current = generations[-1] if generations else 0
        if current:
            record = _read_settled(fs, join(root, f"{current:010d}.json"))
            if not _takeable(record, stale_after_s):
                raise LeaseHeld(output.path, record, stale_after_s)
        now = time.time()
        holder = {"owner": _user(), "host": socket.gethostname(), "pid": os.getpid(),
                  "pid_namespace": process_namespace(), "run_id": run_id,
                  "started_at": datetime.fromtimestamp(now, timezone.utc).isoformat(), "heartbeat_at": now,
                  "released": False, "generation": current + 1}
        path = join(root, f"{current + 1:010d}.json")
        if not output.is_remote:
            fs.makedirs(root, exist_ok=True)
        try:
            with fs.open(path, "xb") as f:
                f.write(json.dumps(holder).encode())
        except Exception as exc:
            if not _lost_race(exc):
                raise
            raise LeaseHeld(output.path, _read_settled(fs, path), stale_after_s) from None  # another run won
        for old in generations:
            if old < current + 1 - 2:
                try:
                    fs.rm_file(join(root, f"{old:010d}.json"))
                except Exception:  # noqa: BLE001 - only tidying; a leftover old record is harmless
                    log.debug("could not delete old lease record %s", old, exc_info=True)
        lease = cls(output, holder, heartbeat_s)
        lease._thread.start()
        return lease

    @property
    def lost(self) -> bool:
        """True when another run has taken the lease over (a newer generation exists), as seen by the heartbeat."""
        return self._lost

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        with self._lock:  # waits for a heartbeat write in progress
            if not self._lost:
                self.holder["released"] = True
                try:
                    self._write()
                except Exception:  # noqa: BLE001 - release runs on the way out; the lease goes stale anyway
                    log.warning("could not mark the lease on %s released; it can be taken once stale",
                                self.output.path, exc_info=True)
        self._thread.join(timeout=5)

    def _beat_loop(self, heartbeat_s: float) -> None:
        failed = 0
        while not self._stop.wait(heartbeat_s):
            try:
                with self._lock:
                    if self._stop.is_set():
                        return
                    if max(_generations(self._fs, self._root), default=0) > self.holder["generation"]:
                        # said before it is set: whoever sees ``lost`` also finds the reason in the log
                        log.error("lease on %s was taken over by another run; this run (%s) no longer holds it",
                                  self.output.path, self.holder["run_id"])
                        self._lost = True
                        return
                    self.holder["heartbeat_at"] = time.time()
                    self._write()
                    failed = 0
            except Exception as exc:  # noqa: BLE001 - a failed heartbeat must not kill the run; the next one retries
                failed += 1  # one console warning per spell of failures (a full disk fails every beat)
                (log.warning if failed == 1 else log.info)(
                    "lease heartbeat for %s failed (%s: %s); retrying every %g s", self.output.path, type(exc).__name__,
                    exc, heartbeat_s, exc_info=failed > 1)

    def _write(self) -> None:
        data = json.dumps(self.holder).encode()
        if self.output.is_remote:  # an S3 PUT replaces the object atomically
            self._fs.pipe_file(self._path, data)
            return
        with replacing(self._fs, self._path) as tmp, self._fs.open(tmp, "wb") as f:
            f.write(data)
