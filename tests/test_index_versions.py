"""Index versions: a build never writes over an index a run may be reading. ``retrieval.index_dir``
is a location of immutable versions and a ``CURRENT`` pointer; a run resolves it once, searches
that version to the end (through replica restarts) and its annotation identity names it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from pipeline.infra.config import load_config
from pipeline.infra.io import Storage
from pipeline.output.identity import annotation_identity, identity_hash
from pipeline.run.preflight import PreflightError, ensure_index
from pipeline.retrieval.index import (
    CURRENT_FILE, INDEX_FILES, IndexBuilder, Retriever, build_index_in_process, build_version, passage_texts,
    resolve_index,
)

DEMO_CORPUS = REPO / "data" / "demo" / "corpus.parquet"
#: The storage of the local index locations these tests build.
LOCAL = Storage()
MODEL = REPO / "models" / "tiny-selfrag"


def write_corpus(path: Path, prefix: str = "", rows: int = 40) -> pa.Table:
    """The first ``rows`` demo passages, their ids prefixed (a changed corpus at the same path)."""
    table = pq.read_table(DEMO_CORPUS).slice(0, rows)
    table = table.set_column(table.schema.get_field_index("id"), "id",
                             pa.array([prefix + i for i in table.column("id").to_pylist()]))
    pq.write_table(table, path)
    return table


def config(corpus: Path, index_dir: str, *overrides: str):
    return load_config([], [f"retrieval.corpus={corpus}", f"retrieval.index_dir={index_dir}",
                            f"engine.model={MODEL}", *overrides])


def fingerprint(directory: str) -> dict:
    """Each index file's inode and SHA-256: a file rewritten or replaced changes one of them."""
    out = {}
    for name in INDEX_FILES:
        path = Path(directory) / name
        out[name] = (path.stat().st_ino, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def test_builds_add_versions_and_never_write_over_one(tmp_path):
    corpus, location = tmp_path / "corpus.parquet", str(tmp_path / "idx")
    write_corpus(corpus)
    cfg = config(corpus, location).retrieval
    v1, meta1 = build_version(LOCAL, location, partial(build_index_in_process, cfg, LOCAL))
    before = fingerprint(v1)
    write_corpus(corpus, "new-")
    v2, meta2 = build_version(LOCAL, location, partial(build_index_in_process, cfg, LOCAL))
    assert v1 != v2 and Path(v1).parent == Path(v2).parent == Path(location)
    assert (meta1["version"], meta2["version"]) == (Path(v1).name, Path(v2).name)
    assert fingerprint(v1) == before  # the first version is untouched
    assert (Path(location) / CURRENT_FILE).read_text().strip() == Path(v2).name
    assert resolve_index(LOCAL, location) == v2 and resolve_index(LOCAL, v1) == v1
    assert sorted(os.listdir(location)) == sorted([CURRENT_FILE, Path(v1).name, Path(v2).name])  # no staging left
    assert Retriever(cfg, LOCAL).store.fetch([0])[0]["id"].startswith("new-")  # a location: its current version
    # nothing writes over an index: not the builder, not a build into a version
    with pytest.raises(ValueError, match="already holds an index"):
        IndexBuilder(cfg, 384, v1)
    with pytest.raises(ValueError, match=f"{v1} is one version of the index at {location}"):
        build_version(LOCAL, v1, partial(build_index_in_process, cfg, LOCAL))
    assert fingerprint(v1) == before


def test_the_old_layout_is_read_as_one_version_and_a_rebuild_goes_beside_it(tmp_path):
    corpus, location = tmp_path / "corpus.parquet", str(tmp_path / "idx")
    write_corpus(corpus)
    old = config(corpus, location)
    build_index_in_process(old.retrieval, LOCAL, location)  # files directly in index_dir: the layout before versions
    before = fingerprint(location)
    assert ensure_index(old, LOCAL) == location == old.retrieval.index_dir
    assert "index_version" not in annotation_identity(old, LOCAL)["retrieval"]  # identities of the old layout unchanged
    write_corpus(corpus, "new-")
    new = config(corpus, location)
    version = ensure_index(new, LOCAL)  # the corpus changed: a new version beside the old files
    assert Path(version).parent == Path(location) and fingerprint(location) == before
    assert annotation_identity(new, LOCAL)["retrieval"]["index_version"] == Path(version).name
    assert not Retriever(old.retrieval, LOCAL, exact=True).store.fetch([0])[0]["id"].startswith("new-")
    assert Retriever(new.retrieval, LOCAL, exact=True).store.fetch([0])[0]["id"].startswith("new-")


def test_a_pinned_version_is_searched_as_named_and_never_rebuilt(tmp_path):
    corpus, location = tmp_path / "corpus.parquet", str(tmp_path / "idx")
    write_corpus(corpus)
    v1 = ensure_index(config(corpus, location), LOCAL)
    assert ensure_index(config(corpus, v1), LOCAL) == v1  # naming a version pins it
    write_corpus(corpus, "new-")
    with pytest.raises(PreflightError, match=f"names the index version {v1}.*set retrieval.index_dir to its "
                                             f"location {location}"):
        ensure_index(config(corpus, v1), LOCAL)
    assert ensure_index(config(corpus, v1, "retrieval.build_if_missing=false"), LOCAL) == v1
    assert resolve_index(LOCAL, location) == v1  # the refusal built nothing


def test_a_dangling_current_pointer_is_a_clear_refusal(tmp_path):
    corpus, location = tmp_path / "corpus.parquet", tmp_path / "idx"
    write_corpus(corpus)
    location.mkdir()
    (location / CURRENT_FILE).write_text("v-gone\n")
    with pytest.raises(PreflightError, match=f"unusable retrieval index at {location}: .*names v-gone, which is "
                                             "not a complete index"):
        ensure_index(config(corpus, str(location)), LOCAL)


def test_the_build_job_refuses_to_build_into_a_version(tmp_path):
    corpus, location = tmp_path / "corpus.parquet", str(tmp_path / "idx")
    write_corpus(corpus)
    v1 = ensure_index(config(corpus, location), LOCAL)
    proc = subprocess.run([sys.executable, "-m", "jobs.build_index", f"retrieval.corpus={corpus}",
                           f"retrieval.index_dir={v1}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{v1} is one version of the index at {location}" in proc.stderr


def replica_names(app: str) -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#")}


def search_until_served(handle, queries: list[str], timeout_s: float = 120) -> list[list[dict]]:
    """Search through a Serve handle, retrying while a replica restarts."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return handle.search.remote(queries, 3).result(timeout_s=30)
        except Exception:  # noqa: BLE001 - a replica being replaced
            if time.time() > deadline:
                raise
            time.sleep(1)


@pytest.mark.integration
def test_a_rebuild_beside_a_running_job_never_touches_the_index_it_searches(tmp_path):
    """Run A resolves the index location and its retrieval service (a real Serve replica, index
    and passages memory-mapped) searches it; run B, another output with the same index_dir,
    finds the corpus changed and builds. A's files are untouched, A's replica keeps answering
    from A's corpus, a replica Serve restarts loads A's version again, and A's identity still
    names that version; B and every later run search the new one, under another identity."""
    import ray
    from ray import serve

    from pipeline.runtime.ray_connect import init_ray
    from pipeline.services.deploy import check_reused_retriever, retriever_application

    corpus, location = tmp_path / "corpus.parquet", str(tmp_path / "index")
    old_rows = write_corpus(corpus, rows=60)
    run_a = config(corpus, location, "selfrag.mode=always", f"output.path={tmp_path / 'out-a'}")
    version_a = ensure_index(run_a, LOCAL)  # A's preflight
    identity_a = annotation_identity(run_a, LOCAL)
    files_a = fingerprint(version_a)
    queries = passage_texts(old_rows.slice(0, 4))
    expected = [row["id"] for row in old_rows.slice(0, 4).to_pylist()]

    init_ray(None, configure_logging=False)
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(retriever_application(run_a, None), name="retriever-a", route_prefix=None)
        assert [found[0]["id"] for found in search_until_served(handle, queries)] == expected
        replicas = replica_names("retriever-a")

        write_corpus(corpus, "new-", rows=60)  # the corpus changes; run B (another output) builds
        run_b = config(corpus, location, "selfrag.mode=always", f"output.path={tmp_path / 'out-b'}")
        version_b = ensure_index(run_b, LOCAL)

        assert version_b != version_a and Path(version_b).parent == Path(location)
        assert fingerprint(version_a) == files_a  # not one byte of A's version changed
        assert [found[0]["id"] for found in search_until_served(handle, queries)] == expected
        assert replica_names("retriever-a") == replicas  # A's replica did not die
        assert annotation_identity(run_a, LOCAL) == identity_a  # A's identity still names A's version
        assert identity_a["retrieval"]["index_version"] == Path(version_a).name

        # a replica Serve restarts mid-run loads A's version again, not what CURRENT names now
        for name in replicas:
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        deadline = time.time() + 120
        # one snapshot per check: between two lookups the killed replica may vanish before its
        # replacement appears
        while (not (names := replica_names("retriever-a")) or names & replicas) and time.time() < deadline:
            time.sleep(0.5)
        assert names and not names & replicas, names
        assert [found[0]["id"] for found in search_until_served(handle, queries)] == expected
        assert handle.index_meta.remote().result(timeout_s=60)["version"] == Path(version_a).name

        # a job reusing A's running service for B's version is refused; for A's version it is not
        check_reused_retriever("retriever-a", version_a, LOCAL)
        with pytest.raises(RuntimeError, match=f"searches the index version {Path(version_a).name}, but this "
                                               f"run resolved {version_b}"):
            check_reused_retriever("retriever-a", version_b, LOCAL)
    finally:
        serve.shutdown()
        ray.shutdown()

    identity_b = annotation_identity(run_b, LOCAL)
    assert identity_b["retrieval"]["index_version"] == Path(version_b).name
    assert identity_hash(identity_b) != identity_hash(identity_a)
    later = config(corpus, location, "selfrag.mode=always")  # a new run of the same command picks B's version
    assert ensure_index(later, LOCAL) == version_b and annotation_identity(later, LOCAL) == identity_b
    assert Retriever(later.retrieval, LOCAL, exact=True).search([queries[0]], 1)[0][0]["id"] == "new-" + expected[0]
