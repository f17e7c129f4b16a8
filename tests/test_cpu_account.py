"""The benchmark's CPU account: a process's CPU time lands in its role, over the window asked for."""

import subprocess
import sys
import time
import uuid

from pipeline.bench import cpu_account
from pipeline.bench.cpu_account import CpuAccount


def burn(cpu_seconds: float) -> None:
    """Spin until this process has used ``cpu_seconds`` more of CPU time (however busy the machine is)."""
    end = time.process_time() + cpu_seconds
    while time.process_time() < end:
        pass


def next_samples(account: CpuAccount, n: int = 2, timeout_s: float = 60) -> None:
    """Wait until the account has taken ``n`` more samples."""
    until, deadline = len(account.samples) + n, time.time() + timeout_s
    while len(account.samples) < until:
        assert time.time() < deadline, "the account stopped sampling"
        time.sleep(0.05)


def test_cpu_time_is_summed_by_role_over_the_window(monkeypatch):
    """A child with a title of its own role uses 1.0 s of CPU between two samples and idles
    around them; this process (the driver) uses 0.6 s. Counted in CPU seconds, not cores, and
    by a title no other process has, so the figures depend neither on how busy the machine is
    nor on what else runs on it."""
    title = f"selfrag-cpu-account-test-{uuid.uuid4().hex}"
    monkeypatch.setattr(cpu_account, "ROLES", ((title, "busy_child"),) + cpu_account.ROLES)
    account = CpuAccount(interval_s=0.2).start()
    t0, cpu0 = time.time(), time.process_time()
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys, time\nprint('ready', flush=True)\nsys.stdin.readline()\n"
                              "end = time.process_time() + 1.0\nwhile time.process_time() < end: pass\n"
                              "print('done', flush=True)\ntime.sleep(60)", title],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        next_samples(account)  # the child's start-up is sampled before the window's CPU use
        child.stdin.write("go\n")
        child.stdin.flush()
        burn(0.6)
        assert child.stdout.readline() == "done\n"
        next_samples(account)  # and its total after it
    finally:
        child.kill()
        child.wait()
    account.stop()
    t1, driver_cpu = time.time(), time.process_time() - cpu0
    seconds = {role: cores * (t1 - t0) for role, cores in account.cores(t0, t1).items()}
    assert 0.85 < seconds["busy_child"] < 1.15, seconds
    # its own CPU time, less the account's sampling (counted as "other")
    assert driver_cpu >= 0.6 and 0 < account.own_seconds < 0.15, (driver_cpu, account.own_seconds)
    assert abs(seconds["driver"] - (driver_cpu - account.own_seconds)) < 0.15, (seconds, driver_cpu)
    assert account.cores(t1, t1 + 10) == {}  # nothing sampled after stop
