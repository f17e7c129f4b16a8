"""A stop reaches the driver's main thread even while it waits inside a Ray call: SIGTERM, and a
service that never starts (real local Ray; the signal is sent once the main thread is seen
waiting in ``ray.get``)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from pipeline.run.exit_codes import exit_status
from pipeline.run.signals import Interrupted, catch_interrupts, restore_signals
from pipeline.runtime.main_stop import reason
from pipeline.services import deploy

pytestmark = pytest.mark.integration


def main_thread_in_ray_get() -> bool:
    """Whether the main thread is now inside ``ray.get`` (its stack holds Ray's ``get`` frame)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code.co_name == "get" and frame.f_code.co_filename.endswith(os.path.join("_private", "worker.py")):
            return True
        frame = frame.f_back
    return False


def once_main_waits_in_ray_get(action) -> threading.Thread:
    """Run ``action`` in a thread as soon as the main thread waits in ``ray.get``."""
    def watch():
        while not main_thread_in_ray_get():
            time.sleep(0.01)
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def blocked(ray_session):
    """A Ray task that never ends (cancelled after the test)."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=0)
    def wait_for_ever():
        threading.Event().wait()

    refs = []

    def start():
        refs.append(wait_for_ever.remote())
        return refs[-1]

    yield start
    for ref in refs:
        ray.cancel(ref, force=True)


def test_sigterm_while_the_driver_waits_in_ray_get_stops_it_as_sigterm(blocked):
    import ray

    catch_interrupts()
    try:
        ref = blocked()
        once_main_waits_in_ray_get(lambda: os.kill(os.getpid(), signal.SIGTERM))
        with pytest.raises(KeyboardInterrupt) as raised:  # before: printed and lost, ray.get ran to its timeout
            ray.get(ref, timeout=60)
    finally:
        restore_signals()
    assert isinstance(reason(raised.value), Interrupted)
    assert exit_status(raised.value)[0] == 128 + signal.SIGTERM


def test_a_service_that_fails_to_start_stops_the_driver_waiting_in_ray_get(blocked, monkeypatch):
    import ray

    def fails_once_main_waits(names, timeout_s, why_not, cancelled=None):
        while not main_thread_in_ray_get():
            time.sleep(0.01)
        raise deploy.ServicesUnavailable(f"{names[0]} not running {timeout_s:g} s after deployment")

    monkeypatch.setattr(deploy, "wait_until_running", fails_once_main_waits)
    ref = blocked()
    with pytest.raises(deploy.ServicesUnavailable, match="selfrag-engine not running 0.5 s after deployment"):
        with deploy.services_awaited_beside(deploy.Services(owned=["selfrag-engine"], start_timeout_s=0.5)):
            ray.get(ref, timeout=60)
