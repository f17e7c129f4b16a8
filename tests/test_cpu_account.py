"""The benchmark's CPU account: a process's CPU time lands in its role, over the window asked for."""

import subprocess
import sys
import time

from pipeline.bench.cpu_account import CpuAccount


def test_cpu_time_is_summed_by_role_over_the_window():
    account = CpuAccount(interval_s=0.2).start()
    t0 = time.time()
    # a busy child titled like a vLLM engine core, and this process (the driver) busy too
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 2.5: pass",
                              "VLLM::EngineCore"])
    end = time.time() + 2.5
    while time.time() < end:
        pass
    child.wait()
    time.sleep(0.5)
    account.stop()
    t1 = time.time()
    cores = account.cores(t0, t1)
    assert 0.4 < cores["engine_core"] < 1.05, cores  # 2.5 s busy in a window of about 3 s (2 cores, shared)
    assert 0.4 < cores["driver"] < 1.05, cores
    assert account.cores(t1, t1 + 10) == {}  # nothing sampled after stop
