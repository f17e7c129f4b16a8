"""The annotation identity that guards a resume: run settings never change it, anything that
changes an annotation does, the markers a real run writes record it, and a refused resume names
what changed."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import DEMO_QUERIES, REPO
from pipeline.infra.config import load_config
from pipeline.infra.io import Storage
from pipeline.output.folder import OutputFolder
from pipeline.output.identity import annotation_identity, identity_hash
from pipeline.run.preflight import PreflightError, split_done


@pytest.fixture
def base(tmp_path):
    """Overrides that point at a hand-made index (only its meta.json is read) and a model copy."""
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "meta.json").write_text(json.dumps({"encoder": "e", "corpus_sha256": "c1", "count": 3}))
    shutil.copytree(REPO / "models" / "tiny-selfrag", tmp_path / "model")
    return [f"retrieval.index_dir={tmp_path / 'index'}", f"engine.model={tmp_path / 'model'}"]


def identity(base, *overrides):
    return annotation_identity(load_config([], [*base, *overrides]), Storage())


RUN_SETTINGS = [
    "stages.chain.replicas=4", "stages.chain.batch_size=3", "stages.chain.max_concurrent_batches=2",
    "engine.service.replicas=3", "engine.service.max_ongoing_requests=8", "retrieval.service.num_cpus=2",
    "engine.gpu_memory_utilization=0.5", "engine.extra.max_num_seqs=64", "engine.tensor_parallel_size=2",
    "ray.progress_bars=true", "storage.cache_dir=/elsewhere", "storage.endpoint_url=http://127.0.0.1:9",
    "output.buffer_rows=5", "output.stage_rows=5", "output.lease_stale_after_s=100", "run_id=nightly-2",
    "input.paths=[/other/inputs]", "debug.exit_after_shards=1", "log_level=debug", "output.report=false",
    "output.examples=3", "stages.chain=null", "stages.chain.replicas=2", "ray.dashboard=true",
    "engine.extra.scheduling_policy=fcfs", "engine.batches_in_flight_per_replica=null",
    "ray.serve_control_loop_s=2",
]


@pytest.mark.parametrize("override", RUN_SETTINGS)
def test_run_settings_leave_the_identity_unchanged(base, override):
    assert identity(base, override) == identity(base)


ANNOTATION_SETTINGS = [
    "selfrag.threshold=0.5", "selfrag.top_k=3", "selfrag.long_form.beam_width=3", "selfrag.prompt_style=paper",
    "engine.dtype=bfloat16", "engine.max_model_len=512", "engine.extra.quantization=fp8", "input.question_column=q",
    "input.default_task=fever", "output.keep_logprobs=true", "retrieval.nprobe=4", "retrieval.max_length=64",
    "retrieval.dtype=float16",  # the default resolves to bfloat16 or float32 (by the CPU)
]


@pytest.mark.parametrize("override", ANNOTATION_SETTINGS)
def test_annotation_settings_change_the_identity(base, override):
    assert identity_hash(identity(base, override)) != identity_hash(identity(base))


def test_how_queries_are_padded_is_part_of_it_on_a_cpu(base):
    """On a CPU a query's vector depends on the width it is padded to (QUERY_WIDTH_STEP): an
    output written with another padding is not resumed into. On cuda batches are padded to
    their longest (not batch-invariant anyway): nothing to record."""
    assert identity(base)["retrieval"]["query_width_step"] == 16
    assert "query_width_step" not in identity(base, "retrieval.device=cuda")["retrieval"]


def test_the_model_files_and_the_index_are_part_of_it(base, tmp_path):
    before = identity_hash(identity(base))
    with open(tmp_path / "model" / "config.json", "a") as f:
        f.write("\n")
    after_model = identity_hash(identity(base))
    (tmp_path / "index" / "meta.json").write_text(json.dumps({"encoder": "e", "corpus_sha256": "c2", "count": 3}))
    assert len({before, after_model, identity_hash(identity(base))}) == 3
    # a model directory moved elsewhere with the same files annotates the same
    shutil.copytree(tmp_path / "model", tmp_path / "moved")
    assert identity(base, f"engine.model={tmp_path / 'moved'}") == identity(base)


def test_never_mode_does_not_depend_on_the_index(base, tmp_path):
    shutil.rmtree(tmp_path / "index")
    assert "retrieval" not in identity(base, "selfrag.mode=never")


def test_a_resume_with_new_run_settings_proceeds_and_one_with_a_new_threshold_is_refused(base):
    written = identity(base)
    marker = {"shard": "q", "rows": 1, "annotation_hash": identity_hash(written), "annotation_identity": written}
    cfg = load_config([], base)
    rows, markers = {"q": 1, "r": 2}, {"q": marker, "r": None}
    rescaled = identity(base, "stages.chain=null", "stages.critique.replicas=8", "stages.critique.batch_size=4",
                        "engine.service.replicas=2")
    todo, done = split_done(cfg, OutputFolder.of(cfg), rows, markers, rescaled)
    assert todo == {"r": 2} and done == [marker]
    with pytest.raises(PreflightError, match=r"selfrag\.threshold: 0\.2 -> 0\.5") as refused:
        split_done(cfg, OutputFolder.of(cfg), rows, markers, identity(base, "selfrag.threshold=0.5"))
    assert "another annotation identity" in str(refused.value)


def test_a_marker_of_an_older_version_is_refused_with_a_reason(base):
    cfg = load_config([], base)
    with pytest.raises(PreflightError, match="older version"):
        split_done(cfg, OutputFolder.of(cfg), {"q": 1}, {"q": {"shard": "q", "config_hash": "0123456789ab"}},
                   identity(base))


@pytest.mark.integration
def test_a_run_records_its_identity_and_a_resume_with_a_new_threshold_names_it(tmp_path, capsys, ray_session,
                                                                             simulated_engine):
    """Through ``jobs.annotate.main`` (never mode, two demo questions, the simulated engine
    answering from a real run's recording): the markers record the annotation identity, and the
    same output with another ``selfrag.threshold`` is refused (exit 2, nothing touched) with one
    line naming that key, and only it."""
    import pyarrow.parquet as pq

    from jobs.annotate import main

    (tmp_path / "in").mkdir()
    pq.write_table(pq.read_table(next(DEMO_QUERIES.glob("*.parquet"))).slice(0, 2), tmp_path / "in" / "q.parquet")
    overrides = [f"input.paths={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", "selfrag.mode=never",
                 "output.report=false", "output.examples=0", "ray.progress_bars=false", *simulated_engine]
    assert main(overrides) == 0
    marker = json.loads((tmp_path / "out" / "_done" / "q.json").read_text())
    written = annotation_identity(load_config([], overrides), Storage())
    assert marker["annotation_hash"] == identity_hash(written)
    assert marker["annotation_identity"]["selfrag"]["threshold"] == 0.2
    assert marker["annotation_identity"]["engine"]["simulated"] is True  # never mixed with a real engine's rows
    assert identity_hash(marker["annotation_identity"]) == marker["annotation_hash"]
    output_before = (tmp_path / "out" / "q.parquet").read_bytes()
    capsys.readouterr()

    assert main([*overrides, "selfrag.threshold=0.5"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    assert "another annotation identity" in errors[0] and "older version" not in errors[0]
    assert ": selfrag.threshold: 0.2 -> 0.5. Use another output.path" in errors[0]
    assert (tmp_path / "out" / "q.parquet").read_bytes() == output_before


def test_a_marker_without_its_identity_is_explained_from_the_manifest(base, tmp_path):
    """Markers written before they recorded the identity: the run manifest's identity, when its
    hash is the marker's, still names what changed."""
    cfg = load_config([], [*base, f"output.path={tmp_path / 'out'}"])
    written = annotation_identity(cfg, Storage())
    (tmp_path / "out").mkdir()
    marker = {"shard": "q", "rows": 1, "annotation_hash": identity_hash(written)}
    (tmp_path / "out" / "_manifest.json").write_text(json.dumps({"annotation_identity": written}))
    with pytest.raises(PreflightError, match=r"selfrag\.top_k: 5 -> 3\. Use"):
        split_done(cfg, OutputFolder.of(cfg), {"q": 1}, {"q": marker}, identity(base, "selfrag.top_k=3"))
    # a manifest of another identity (a later run with other settings) does not speak for the marker
    (tmp_path / "out" / "_manifest.json").write_text(json.dumps({"annotation_identity": identity(base, "selfrag.top_k=4")}))
    with pytest.raises(PreflightError, match="older version"):
        split_done(cfg, OutputFolder.of(cfg), {"q": 1}, {"q": marker}, identity(base, "selfrag.top_k=3"))
