"""One run per output: the lease on an output location, on local disk and on S3 (a moto server
on 127.0.0.1, which honours ``If-None-Match: *`` on PutObject)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from conftest import start_moto
from pipeline.infra.config import StorageConfig
from pipeline.infra.io import Storage, join
from pipeline.output.folder import OutputFolder
from pipeline.output.lease import Lease, LeaseHeld, process_namespace

BACKENDS = ["local", pytest.param("s3", marks=pytest.mark.integration)]


@pytest.fixture(scope="module")
def s3_bucket():
    """A moto S3 server with a bucket, this process's AWS variables pointing at it; the storage
    that reaches it."""
    proc, endpoint = start_moto()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in (("AWS_ACCESS_KEY_ID", "AKIATESTKEY"), ("AWS_SECRET_ACCESS_KEY", "test-secret"),
                               ("AWS_DEFAULT_REGION", "us-east-1")):
                mp.setenv(key, value)
            storage = Storage(StorageConfig(endpoint_url=endpoint))
            fs, _ = storage.filesystem("s3://leases")
            fs.mkdir("leases")
            yield storage
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(params=BACKENDS)
def output(request, tmp_path) -> OutputFolder:
    """A fresh output location, local or s3://."""
    if request.param == "local":
        return local(tmp_path / "out")
    return OutputFolder(f"s3://leases/{uuid.uuid4().hex}", request.getfixturevalue("s3_bucket"))


def local(path) -> OutputFolder:
    """A local output location."""
    return OutputFolder(str(path), Storage())


@pytest.fixture
def take():
    """Lease.acquire, releasing every lease taken at the end of the test (stopping its heartbeat)."""
    taken = []

    def acquire(*args, **kwargs) -> Lease:
        lease = Lease.acquire(*args, **kwargs)
        taken.append(lease)
        return lease

    yield acquire
    for lease in taken:
        lease.release()


def record_path(output: OutputFolder, generation: int) -> str:
    return join(output.path, "_lease", f"{generation:010d}.json")


def read_record(output: OutputFolder, generation: int) -> dict:
    return json.loads(output.read_text(record_path(output, generation)))


def write_record(output: OutputFolder, generation: int = 1, **fields) -> None:
    """Write a lease record as another run would: through a client of its own (on S3, one whose
    listing cache this process's client knows nothing about)."""
    record = {"owner": "someone", "host": "elsewhere", "pid": 1, "run_id": "hand-written",
              "started_at": "2026-01-01T00:00:00+00:00", "heartbeat_at": time.time(), "released": False,
              "generation": generation, **fields}
    fs, path = output.storage.filesystem(record_path(output, generation))
    other = type(fs)(skip_instance_cache=True, **fs.storage_options)
    if not output.is_remote:
        other.makedirs(os.path.dirname(path), exist_ok=True)
    other.pipe_file(path, json.dumps(record).encode())


def generations(output: OutputFolder) -> list[str]:
    fs, root = output.storage.filesystem(join(output.path, "_lease"))
    fs.invalidate_cache()
    return sorted(os.path.basename(p) for p in fs.ls(root, detail=False) if p.endswith(".json"))


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_second_run_is_refused_until_the_first_releases(output, take):
    first = take(output, "run-a", heartbeat_s=60)
    assert first.holder["generation"] == 1 and read_record(output, 1)["run_id"] == "run-a"
    with pytest.raises(LeaseHeld) as refused:
        Lease.acquire(output, "run-b")
    message = str(refused.value)
    assert socket.gethostname() in message and f"pid {os.getpid()}" in message and "run-a" in message
    assert "stale" in message and refused.value.holder["run_id"] == "run-a"

    first.release()
    first.release()  # idempotent
    assert read_record(output, 1)["released"] is True
    second = take(output, "run-b", heartbeat_s=60)
    assert second.holder["generation"] == 2 and read_record(output, 2)["run_id"] == "run-b"


def test_a_stale_lease_is_taken_over_a_fresh_one_from_another_host_is_not(output, take):
    write_record(output, heartbeat_at=time.time() - 30)
    with pytest.raises(LeaseHeld, match="hand-written"):
        Lease.acquire(output, "too-early", stale_after_s=60)
    lease = take(output, "taker", stale_after_s=10)
    assert lease.holder["generation"] == 2 and read_record(output, 2)["run_id"] == "taker"


def test_the_old_holder_sees_the_takeover_at_its_next_heartbeat(output, take, caplog):
    old = take(output, "old", heartbeat_s=0.2)
    time.sleep(0.05)
    new = take(output, "new", stale_after_s=0.01, heartbeat_s=60)  # old's last heartbeat is older than that
    assert new.holder["generation"] == 2 and not old.lost
    assert wait_for(lambda: old.lost)
    assert not new.lost and "taken over" in caplog.text
    old.release()  # does not touch the new holder's record
    assert not read_record(output, 2)["released"]
    with pytest.raises(LeaseHeld, match="new"):
        Lease.acquire(output, "third")


def test_a_takeover_written_by_another_client_is_seen(output, take):
    old = take(output, "old", heartbeat_s=0.1)
    started = old.holder["heartbeat_at"]
    assert wait_for(lambda: old.holder["heartbeat_at"] > started)  # its listing of _lease/ is cached now
    write_record(output, generation=2, run_id="from-elsewhere")
    assert wait_for(lambda: old.lost)
    with pytest.raises(LeaseHeld, match="from-elsewhere"):
        Lease.acquire(output, "another")


def test_a_retried_acquire_sees_the_generations_written_since(output):
    write_record(output, run_id="first")
    with pytest.raises(LeaseHeld, match="first"):
        Lease.acquire(output, "patient")  # lists _lease/ (s3fs caches listings)
    write_record(output, released=True, run_id="first")
    write_record(output, generation=2, released=True, run_id="second")
    write_record(output, generation=3, run_id="third")
    with pytest.raises(LeaseHeld, match="third"):
        Lease.acquire(output, "patient")


def test_of_many_runs_taking_over_a_stale_lease_at_once_exactly_one_wins(output):
    for round_ in range(3):
        where = OutputFolder(join(output.path, str(round_)), output.storage)
        write_record(where, heartbeat_at=time.time() - 3600)
        barrier, won, refused = threading.Barrier(8), [], []

        def contend(i: int) -> None:
            barrier.wait()
            try:
                won.append(Lease.acquire(where, f"contender-{i}", heartbeat_s=60))
            except LeaseHeld as exc:
                refused.append(exc)

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            assert len(won) == 1 and len(refused) == 7
            winner = won[0].holder["run_id"]
            assert read_record(where, 2)["run_id"] == winner and generations(where) == ["0000000001.json",
                                                                                       "0000000002.json"]
            assert all(exc.holder["run_id"] == winner for exc in refused)
        finally:
            for lease in won:
                lease.release()


def test_the_heartbeat_advances(tmp_path, take):
    output = local(tmp_path / "out")
    lease = take(output, "beating", heartbeat_s=0.1)
    first = read_record(output, 1)["heartbeat_at"]
    assert wait_for(lambda: read_record(output, 1)["heartbeat_at"] > first)
    assert lease.holder["heartbeat_at"] > first and not lease.lost


def test_a_dead_holder_on_this_host_is_taken_over_a_live_one_is_not(tmp_path, take):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = process_namespace()
    assert here is not None and "pid:[" in here
    output = local(tmp_path / "dead")
    write_record(output, host=socket.gethostname(), pid=dead.pid, pid_namespace=here, run_id="crashed")
    assert take(output, "after-crash").holder["generation"] == 2
    assert read_record(output, 2)["pid_namespace"] == here

    output = local(tmp_path / "live")
    write_record(output, host=socket.gethostname(), pid=os.getpid(), pid_namespace=here, run_id="alive")
    with pytest.raises(LeaseHeld, match="alive"):
        Lease.acquire(output, "other-run")


@pytest.mark.parametrize("namespace", ["another-boot/pid:[4026531836]", None])
def test_a_pid_from_another_pid_namespace_or_boot_is_not_looked_up(tmp_path, namespace):
    """A container sharing the host name, a driver from before a reboot, or a record that does not
    say: its pid may be alive elsewhere, so the lease waits to go stale."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    output = local(tmp_path / "out")
    write_record(output, host=socket.gethostname(), pid=dead.pid, pid_namespace=namespace, run_id="elsewhere")
    with pytest.raises(LeaseHeld, match="elsewhere"):
        Lease.acquire(output, "other-run")


def test_a_malformed_record_is_held_until_it_is_old(tmp_path, take):
    output = local(tmp_path / "out")
    output.write_text(record_path(output, 1), '{"owner": "half-writ')
    with pytest.raises(LeaseHeld, match="run id unknown"):
        Lease.acquire(output, "run", stale_after_s=60)
    old = time.time() - 120
    os.utime(record_path(output, 1), (old, old))
    assert take(output, "run", stale_after_s=60).holder["generation"] == 2


def test_only_the_last_three_generations_are_kept(tmp_path):
    output = local(tmp_path / "out")
    for i in range(5):
        Lease.acquire(output, f"run-{i}", heartbeat_s=60).release()
    assert generations(output) == ["0000000003.json", "0000000004.json", "0000000005.json"]
    assert read_record(output, 5)["run_id"] == "run-4"
