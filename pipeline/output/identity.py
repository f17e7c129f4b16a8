"""The annotation identity: what decides a run's annotations, and nothing else.

A shard's success marker records the identity it was written with; a resume into the same
output must have the same one. It covers the model (a fingerprint of its files, or the hub
id at a resolved revision), the settings that change generation, every ``selfrag.*`` setting,
the retrieval index version the run searches (its ``meta.json``, which names the version) with
the query-side settings, the input column
mapping and the output's optional columns. Replicas, batch sizes, concurrency, storage
options, progress bars and cache paths are run settings: changing them never blocks a resume.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from ..infra.config import Config
from ..infra.io import Storage, directory_fingerprint, is_remote, listing_fingerprint
from ..retrieval.encoder import QUERY_WIDTH_STEP, resolve_dtype
from ..retrieval.index import read_meta

#: ``engine.extra`` keys that only change speed or memory, never a generated token.
THROUGHPUT_ONLY = frozenset({
    "max_num_seqs", "block_size", "max_num_batched_tokens", "enable_chunked_prefill", "enable_prefix_caching",
    "swap_space", "cpu_offload_gb", "disable_log_stats", "max_seq_len_to_capture", "distributed_executor_backend",
    "pipeline_parallel_size", "kv_cache_memory_bytes", "compilation_config", "disable_custom_all_reduce",
    "scheduling_policy",
})


def model_fingerprint(storage: Storage, model: str, revision: str | None = None) -> str:
    """``local:<digest>`` of a model directory's files (names, sizes, content), ``<url>:<digest>``
    of a remote directory's listing (ETags), or ``hub:<id>@<revision>`` of a Hugging Face id,
    with the revision resolved to a commit when the local hub cache has it."""
    if is_remote(model):
        fs, path = storage.filesystem(model)
        return f"remote:{listing_fingerprint(fs.find(path, detail=True))}"
    if storage.exists(model):
        return f"local:{directory_fingerprint(model)}"
    return f"hub:{model}@{hub_commit(model, revision) or revision or 'main'}"


def hub_commit(model: str, revision: str | None) -> str | None:
    """The commit of a hub model's revision in the local cache, or None when it is not cached."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(model, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, or no huggingface_hub: the revision name stands
        return None
    return path.rstrip("/").rsplit("/", 1)[-1]


def index_fingerprint(storage: Storage, index_dir: str) -> str:
    """A digest of the index version's ``meta.json`` (it records the corpus digest, encoder,
    build and version name). ``index_dir`` is the exact version (``preflight.ensure_index``
    resolves a location once): never a pointer that may move while the run searches."""
    meta = read_meta(storage, index_dir)
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def annotation_identity(cfg: Config, storage: Storage) -> dict:
    """Everything that decides the annotations, as plain data (reads the model's files and the
    index's meta.json with ``storage``; call it once, in the driver)."""
    e, r, i = cfg.engine, cfg.retrieval, cfg.input
    extra = {k: v for k, v in sorted(e.extra.items()) if k not in THROUGHPUT_ONLY}
    identity = {
        "model": model_fingerprint(storage, e.model, extra.get("revision")),
        "engine": {"dtype": e.dtype, "max_model_len": e.max_model_len, "seed": e.seed, "extra": extra},
        "selfrag": asdict(cfg.selfrag),
        "input": {"id_column": i.id_column, "question_column": i.question_column, "input_column": i.input_column,
                  "task_column": i.task_column, "ctxs_column": i.ctxs_column, "default_task": i.default_task},
        "output": {"keep_logprobs": cfg.output.keep_logprobs},
    }
    if e.simulated.recording:  # replayed outputs: never mixed with a real engine's in one output
        identity["engine"]["simulated"] = True
    if cfg.selfrag.mode != "never":
        identity["retrieval"] = {
            "index": index_fingerprint(storage, r.index_dir), "encoder": r.encoder, "pooling": r.pooling,
            "normalize": r.normalize, "max_length": r.max_length, "nprobe": r.nprobe, "ef_search": r.ef_search,
            "k_factor": r.k_factor, "dtype": resolve_dtype(r.dtype, r.device),
        }
        if not r.device.startswith("cuda"):  # how queries are padded decides their vectors' last bits
            identity["retrieval"]["query_width_step"] = QUERY_WIDTH_STEP
        version = read_meta(storage, r.index_dir).get("version")
        if version is not None:  # a versioned index: named (an index of the old layout has no name)
            identity["retrieval"]["index_version"] = version
    return identity


def identity_hash(identity: dict) -> str:
    """A short stable hash of an annotation identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def identity_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two identities, as ``key: old -> new``."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += identity_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes
