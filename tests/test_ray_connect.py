"""A job's driver never follows the address file of a Ray cluster that is gone."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO
from pipeline.runtime import ray_connect
from pipeline.runtime.ray_connect import address_file, end_orphaned_agents, resolve_address, stop_ray


@pytest.fixture
def ray_tmp(monkeypatch) -> Path:
    """A Ray temp directory of the test's own, with no cluster file yet (short: Ray's socket
    paths under it must fit a unix socket name)."""
    base = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(base))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (base / "ray").mkdir()
    yield base / "ray" / "ray_current_cluster"
    shutil.rmtree(base, ignore_errors=True)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_address_file_follows_ray_tmpdir(ray_tmp):
    assert address_file() == str(ray_tmp)


def test_no_file_leaves_the_choice_to_ray(ray_tmp):
    assert resolve_address(None) is None


def test_a_file_naming_a_cluster_that_answers_is_followed(ray_tmp):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        ray_tmp.write_text(f"127.0.0.1:{server.getsockname()[1]}")
        assert resolve_address(None) is None


def test_a_file_naming_a_gone_cluster_starts_a_local_ray(ray_tmp, caplog):
    ray_tmp.write_text(f"127.0.0.1:{closed_port()}\n")
    assert resolve_address(None) == "local"
    assert "does not answer" in caplog.text and str(ray_tmp) in caplog.text


@pytest.mark.parametrize("content", ["", "garbage", "127.0.0.1:notaport"])
def test_an_unreadable_file_never_hangs(ray_tmp, content):
    ray_tmp.write_text(content)
    assert resolve_address(None) in (None, "local")


def test_an_explicit_address_or_ray_address_wins(ray_tmp, monkeypatch):
    ray_tmp.write_text(f"127.0.0.1:{closed_port()}")
    assert resolve_address("10.0.0.1:6379") == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert resolve_address(None) is None


def test_a_driver_starts_a_local_ray_past_a_stale_address_file(ray_tmp):
    """The real thing: Ray alone retries the gone cluster's GCS for ever; init_ray starts a
    local Ray at once and says why. After its ray.shutdown, a Ray call in that process fails
    instead of starting a Ray of its own (``no_auto_connect``)."""
    ray_tmp.write_text(f"127.0.0.1:{closed_port()}")
    code = ("from pipeline.runtime.ray_connect import init_ray; import ray; init_ray(None); "
            "print('resources', ray.cluster_resources().get('CPU')); ray.shutdown()\n"
            "try:\n    ray.put(1)\nexcept Exception as exc:\n    print('refused', type(exc).__name__)\n"
            "print('connected', ray.is_initialized())")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ENABLE_AUTO_CONNECT")  # the suite's own guard: here init_ray is what must set it
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resources" in proc.stdout
    assert "does not answer" in proc.stderr
    assert "refused" in proc.stdout and "connected False" in proc.stdout, proc.stdout


def spawn(title: str, parent_title: str | None, code: str = "import time; time.sleep(120)") -> int:
    """A process titled ``title`` (as Ray's agents are), started by a parent titled
    ``parent_title`` that stays, or (None) by one that exits at once; returns its pid."""
    launcher = (f"import subprocess, sys, time; p = subprocess.Popen([{title!r}, '-c', {code!r}], "
                f"executable={sys.executable!r}); print(p.pid, flush=True); "
                + ("time.sleep(120)" if parent_title else "sys.exit(0)"))
    proc = subprocess.Popen([parent_title or "python", "-c", launcher], executable=sys.executable,
                            stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    if parent_title is None:
        proc.wait()
    deadline = time.time() + 30
    while psutil.Process(pid).cmdline()[:1] != [title]:  # until it runs under its title
        assert time.time() < deadline
        time.sleep(0.05)
    return pid


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_agents_whose_raylet_is_gone_are_ended_and_those_of_a_running_ray_kept():
    """What a killed driver's local Ray leaves (Ray's agents, their raylet gone) does not wait a
    minute or two for the next run; the agents of a Ray that runs are not touched."""
    orphan = spawn("ray::DashboardAgent", None)
    kept = spawn("ray::RuntimeEnvAgent", "raylet")
    try:
        ended = end_orphaned_agents(grace_s=1)
        assert orphan in ended and kept not in ended
        assert gone(orphan) and not gone(kept)
    finally:
        for pid in (orphan, kept):
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        # the launcher titled "raylet" goes with its child's end: it only sleeps
        for p in psutil.Process().children():
            if p.cmdline()[:1] == ["raylet"]:
                p.kill()
                p.wait()


def test_stop_ray_ends_every_process_a_local_ray_left_even_orphans_that_ignore_sigterm(monkeypatch, tmp_path):
    """A local Ray whose ray.init a signal interrupted: Ray knows none of its processes. Every
    process started since init_ray (children, and their children orphaned on the way, even one
    that ignores SIGTERM) goes; processes this one had before stay."""
    older = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    monkeypatch.setattr(ray_connect, "_children_before", {ray_connect._key(p) for p in psutil.Process().children()})
    monkeypatch.setattr(ray_connect, "_ray_shutdown", lambda: None)
    ready = tmp_path / "ignoring"
    stubborn = ("import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                f"pathlib.Path({str(ready)!r}).touch(); time.sleep(120)")
    agent = spawn("ray::DashboardAgent", "raylet", stubborn)  # the "raylet" exits on SIGTERM, orphaning it
    try:
        while not ready.exists():
            time.sleep(0.05)
        started = time.time()
        stop_ray(grace_s=1)
        assert gone(agent) and time.time() - started < 10
        assert not [p for p in psutil.Process().children() if p.pid != older.pid and not gone(p.pid)]
        assert older.poll() is None and ray_connect._children_before is None
    finally:
        older.kill()
        older.wait()
