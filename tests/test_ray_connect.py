"""A job's driver never follows the address file of a Ray cluster that is gone."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO
from pipeline.ray_connect import address_file, resolve_address


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
    local Ray at once and says why."""
    ray_tmp.write_text(f"127.0.0.1:{closed_port()}")
    code = ("from pipeline.ray_connect import init_ray; import ray; init_ray(None); "
            "print('resources', ray.cluster_resources().get('CPU')); ray.shutdown()")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resources" in proc.stdout
    assert "does not answer" in proc.stderr
