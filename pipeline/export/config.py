"""The export job's configuration: dataclasses with types and defaults, ``key=value`` overrides.

Loaded with OmegaConf as ``pipeline.infra.config`` loads the annotation config; the same storage
options and the same refusal of credentials apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..infra.config import ConfigError, StorageConfig, _error_message, split_list
from ..infra.secrets import WHERE_CREDENTIALS_BELONG, find_credentials

FORMATS = ("parquet", "jsonl")
NEVER_MODE_CHOICES = ("no_retrieval", "skip")
SCORE_KEYS = ("min_s_rel", "min_s_sup", "min_s_use", "min_final")


@dataclass
class FiltersConfig:
    """Quality filters, applied in this order; each one's effect is counted in the card."""

    #: Drop rows whose ``error`` is set (they have no answer).
    drop_errors: bool = True
    #: Drop rows whose answer is empty, or equals the question once normalised.
    drop_empty_or_echo: bool = True
    #: Minimum scores of the evidence behind the answer: the selected candidate's (short form),
    #: every kept segment's that used a passage (long form; ``min_final`` is checked against
    #: each segment's step ``score``). null: no minimum. Rows answered without evidence have
    #: no scores and are not filtered by these.
    min_s_rel: Optional[float] = None
    min_s_sup: Optional[float] = None
    min_s_use: Optional[float] = None
    min_final: Optional[float] = None
    #: Keep only rows with evidence whose answer the model marked ``[Fully supported]`` (every
    #: evidence segment, long form); rows answered without evidence are kept.
    supported_only: bool = False
    #: Drop exact duplicates: rows whose normalised (lowercase, collapsed whitespace) instruction,
    #: input and answer equal those of an earlier row (shards in name order, rows in file order).
    dedupe: bool = True


@dataclass
class ExportRayConfig:
    #: Cluster address; null: RAY_ADDRESS when set (ray job submit), else a new local Ray.
    address: Optional[str] = None
    #: CPUs per shard task.
    num_cpus: float = 1.0
    #: Start Ray's dashboard with a local Ray that the export starts itself (as ``ray.dashboard``
    #: of the annotation job).
    dashboard: bool = False


@dataclass
class ExportConfig:
    #: The annotated run to export (local or s3://); set by ``--run``.
    run: str = ""
    #: Where the dataset goes (local or s3://); required; must not be the run or overlap it.
    output: str = ""
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    #: Share of rows (by a hash of their id, so the same row always lands in the same split)
    #: in the ``validation`` split, in [0, 1).
    validation_fraction: float = 0.05
    #: Rows answered without evidence because the run forced it (``never`` mode: no retrieval
    #: probability, no candidates): ``no_retrieval`` exports them as ``[No Retrieval]``
    #: examples, ``skip`` leaves them out; counted either way.
    never_mode_rows: str = "no_retrieval"
    #: An output that already holds an export (a ``README.md`` or dataset directories) is
    #: refused unless this is true; then those are removed first.
    overwrite: bool = False
    #: File formats written per dataset and split: ``parquet`` and/or ``jsonl``.
    formats: List[str] = field(default_factory=lambda: ["parquet", "jsonl"])
    #: Tokenizer used to find which generated position holds the ISSUP / ISUSE token (critic
    #: probabilities need the run's ``output.keep_logprobs``); null: the run's ``engine.model``
    #: when it is a local directory; otherwise those probabilities are null.
    tokenizer: Optional[str] = None
    ray: ExportRayConfig = field(default_factory=ExportRayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {message}")


def validate(cfg: ExportConfig) -> None:
    """Checks the types cannot express; raises ConfigError naming the key."""
    _check(bool(cfg.run), "run", "must be set (--run OUTPUT of an annotation job)")
    _check(bool(cfg.output), "output", "must be set (output=DIR)")
    _check(0.0 <= cfg.validation_fraction < 1.0, "validation_fraction", f"{cfg.validation_fraction} is outside [0, 1)")
    _check(cfg.never_mode_rows in NEVER_MODE_CHOICES, "never_mode_rows",
           f"{cfg.never_mode_rows!r} is not one of {list(NEVER_MODE_CHOICES)}")
    bad = [f for f in cfg.formats if f not in FORMATS]
    _check(bool(cfg.formats) and not bad, "formats", f"{bad or 'none given'}: choose from {list(FORMATS)}")
    _check(cfg.ray.num_cpus > 0, "ray.num_cpus", "must be positive")


def load_export_config(run: str, overrides: List[str] | None = None) -> ExportConfig:
    """Defaults, then ``run``, then ``key=value`` overrides, validated; refuses credentials."""
    merged = OmegaConf.structured(ExportConfig)
    try:
        OmegaConf.update(merged, "run", run, merge=False)
        for number, item in enumerate(overrides or [], 1):
            if "=" not in item:  # never echoed: a stray argument may be a token pasted by mistake
                raise ConfigError(f"argument {number} is not of the form key=value")
            key, value = item.split("=", 1)
            if key in ("run", "output", "tokenizer"):  # paths stay verbatim (globs, ${)
                OmegaConf.update(merged, key, None if value in ("null", "~") and key == "tokenizer" else value,
                                 merge=False)
            elif key == "formats":
                OmegaConf.update(merged, key, split_list(value), merge=False)
            else:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([f"{key}={value}"]))
        cfg: ExportConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_error_message(exc)) from None
    for key, why in find_credentials(OmegaConf.to_container(OmegaConf.structured(cfg))):
        raise ConfigError(f"config key '{key}': refused because {why}; {WHERE_CREDENTIALS_BELONG}")
    validate(cfg)
    return cfg


def config_dict(cfg: ExportConfig) -> dict:
    """The resolved export config as plain data (for the card)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))
