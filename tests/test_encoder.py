"""The encoder: length-bucketed batches, pre-tokenized ids, compute dtypes (packaged MiniLM, CPU)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import REPO
from pipeline.infra.config import ConfigError, RetrievalConfig, load_config
from pipeline.retrieval import encoder as encoder_module
from pipeline.retrieval.encoder import ONEDNN_ISA_CAP, Encoder, length_batches, padded_width, resolve_dtype, tokenize

# lengths from 3 to ~120 tokens, shuffled, so that sorting by length changes the batches
WORDS = "river mountain velmora speaks language founded kingdom northern coastal ancient".split()
TEXTS = [" ".join(random.Random(i).choices(WORDS, k=1 + (i * 37) % 110)) for i in range(40)]


@pytest.fixture(scope="module")
def encoder():
    return Encoder(RetrievalConfig(encode_batch_size=8, dtype="float32"))


def unsorted_reference(enc: Encoder, texts: list[str]) -> np.ndarray:
    """Batches in the given order, padded by the tokenizer (the encoder before length buckets)."""
    out = []
    for i in range(0, len(texts), enc.cfg.encode_batch_size):
        batch = enc.tokenizer(texts[i : i + enc.cfg.encode_batch_size], padding=True, truncation=True,
                              max_length=enc.cfg.max_length, return_tensors="pt")
        with torch.inference_mode():
            hidden = enc.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy())
    return np.concatenate(out)


def test_length_buckets_give_the_unsorted_vectors_in_the_given_order(encoder):
    got = encoder.encode(TEXTS)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(got, unsorted_reference(encoder, TEXTS), atol=2e-5)
    np.testing.assert_allclose(encoder.encode(TEXTS[:1])[0], got[0], atol=2e-5)  # no padding at all
    assert encoder.encode([]).shape == (0, 384)


def test_pre_tokenized_ids_give_the_text_vectors(encoder):
    ids, lengths = tokenize(encoder.tokenizer, TEXTS, encoder.cfg.max_length)
    assert ids.dtype == np.int32 and len(lengths) == len(TEXTS) and lengths.sum() == len(ids)
    assert list(ids[: lengths[0]]) == encoder.tokenizer(TEXTS[0])["input_ids"]
    np.testing.assert_array_equal(encoder.encode_tokens(ids, lengths), encoder.encode(TEXTS))


@pytest.mark.parametrize("dtype", ["float32", None])
def test_a_query_gets_the_same_vector_in_any_batch(encoder, dtype):
    """Bit for bit in bfloat16 (the default where the CPU computes it: a padded batch's width
    reordered the top 5 of 12 of 1,600 bench queries); float32's matrix library changes the last
    bits with the batch's size, within 1e-6."""
    enc = encoder if dtype == "float32" else Encoder(replace(encoder.cfg, dtype=dtype))
    alone = np.concatenate([enc.encode_queries([text]) for text in TEXTS])
    together = enc.encode_queries(TEXTS + TEXTS[::4])  # lengths from 3 to ~120 tokens, batches of 8
    some = enc.encode_queries(TEXTS[5:30:3])
    if enc.dtype == "bfloat16":
        np.testing.assert_array_equal(together[: len(TEXTS)], alone)
        np.testing.assert_array_equal(some, alone[5:30:3])
    else:
        np.testing.assert_allclose(together[: len(TEXTS)], alone, rtol=0, atol=1e-6)
        np.testing.assert_allclose(some, alone[5:30:3], rtol=0, atol=1e-6)
    np.testing.assert_allclose(together[: len(TEXTS)], enc.encode(TEXTS), atol=2e-5 if enc.dtype == "float32" else 2e-2)
    before = enc.cpu_seconds
    enc.encode_queries(TEXTS)
    assert enc.cpu_seconds > before  # the retrieval replica reports it (encode_cpu_seconds)


def test_length_batches_keep_one_padded_width_per_batch_with_a_width_step():
    lengths = np.array([5, 3, 5, 9, 3, 5, 5])
    assert [b.tolist() for b in length_batches(lengths, 3)] == [[1, 4, 0], [2, 5, 6], [3]]
    assert [b.tolist() for b in length_batches(lengths, 3, width_step=1)] == [[1, 4], [0, 2, 5], [6], [3]]
    # widths of 8: 3 and 5 are one width (8), 9 the next (16)
    assert [b.tolist() for b in length_batches(lengths, 3, width_step=8)] == [[1, 4, 0], [2, 5, 6], [3]]
    assert [b.tolist() for b in length_batches(lengths, 10, width_step=4)] == [[1, 4], [0, 2, 5, 6], [3]]


def test_a_padded_width_depends_on_the_length_alone_and_stays_within_the_limit():
    assert [padded_width(n, 16, 512) for n in (1, 16, 17, 31, 32)] == [16, 16, 32, 32, 32]
    assert [padded_width(n, 16, 100) for n in (97, 100)] == [100, 100]  # not beyond max_length
    assert padded_width(12, 8, None) == 16


def test_bfloat16_on_cpu_is_close_to_float32(encoder):
    bf16 = Encoder(replace(encoder.cfg, dtype="bfloat16"))
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    got, want = bf16.encode(TEXTS), encoder.encode(TEXTS)
    assert got.dtype == np.float32
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.999


@pytest.mark.parametrize("avx512_bf16, amx, on_cpu", [(True, False, "bfloat16"), (False, True, "bfloat16"),
                                                      (False, False, "float32")])
def test_dtype_defaults_by_device_and_bad_values_are_refused(monkeypatch, avx512_bf16, amx, on_cpu):
    flags = {"avx512f", "fma"} | ({"avx512_bf16"} if avx512_bf16 else set()) | ({"amx_bf16"} if amx else set())
    monkeypatch.setattr(encoder_module, "cpu_flags", lambda: flags)
    assert (resolve_dtype(None, "cuda"), resolve_dtype("auto", "cuda:1"), resolve_dtype(None, "cpu")) == \
        ("float16", "float16", on_cpu)
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert load_config([], ["retrieval.dtype=bfloat16"]).retrieval.dtype == "bfloat16"
    assert load_config([], []).retrieval.dtype is None
    for bad in ("float8", "fp16", "half"):
        with pytest.raises(ConfigError, match=r"retrieval\.dtype.*is not one of \['float32', 'float16', 'bfloat16'\]"):
            load_config([], [f"retrieval.dtype={bad}"])
    with pytest.raises(ValueError, match="retrieval.dtype: 'fp16'"):
        resolve_dtype("fp16", "cpu")


def test_the_cpu_flags_say_what_torch_finds():
    """The driver reads the CPU's flags without torch; torch's own check agrees on this machine."""
    assert encoder_module.cpu_has_native_bfloat16() == bool(
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def test_the_builds_tokenize_and_embed_stages_give_the_encoders_vectors(encoder):
    import pyarrow as pa

    from pipeline.infra.config import Config
    from pipeline.stages.embed import EmbedPassages, split_embeddings, tokenize_passages

    passages = pa.table({"id": [str(i) for i in range(len(TEXTS))], "title": ["T"] * len(TEXTS), "text": TEXTS})
    tokenized = tokenize_passages(passages.slice(5), encoder.cfg.encoder, encoder.cfg.max_length)
    assert tokenized.column("input_ids").type == pa.list_(pa.int32())
    cfg = Config()
    cfg.retrieval = encoder.cfg
    out, vectors = split_embeddings(EmbedPassages(cfg)(tokenized.slice(3)))  # Ray hands the actors slices
    assert out.column_names == ["id", "title", "text"] and out.column("id").to_pylist() == passages.column("id").to_pylist()[8:]
    np.testing.assert_allclose(vectors, encoder.encode([f"T {t}" for t in TEXTS[8:]]), atol=2e-5)


INVARIANCE_SCRIPT = """
import json, os, sys
import numpy as np, torch
TEXTS = json.load(sys.stdin)
from pipeline.infra.config import RetrievalConfig
from pipeline.retrieval.encoder import Encoder
if sys.argv[1] == "after":  # oneDNN runs uncapped before the encoder is made
    x = torch.ones(64, 64, dtype=torch.bfloat16)
    (x @ x).sum()
enc = Encoder(RetrievalConfig(encode_batch_size=8, dtype=None))
alone = np.concatenate([enc.encode_queries([text]) for text in TEXTS])
together = enc.encode_queries(TEXTS + TEXTS[::4])[: len(TEXTS)]
print(json.dumps({"dtype": enc.dtype, "max_diff": float(np.abs(alone - together).max()),
                  "onednn": torch.backends.mkldnn.enabled, "cap_left": "ONEDNN_MAX_CPU_ISA" in os.environ}))
"""


def test_a_query_gets_the_same_vector_in_any_batch_in_a_process_without_the_cap_also_where_onednn_ran_first():
    """A fresh process without ``ONEDNN_MAX_CPU_ISA``: made first, the encoder caps oneDNN itself
    and keeps it, and takes the cap out of the environment again (processes started later keep
    AMX); made after an uncapped bfloat16 product, its probe turns oneDNN off where the vectors
    then depend on the batch (a CPU with AMX). Either way a query's bits do not."""
    env = {k: v for k, v in os.environ.items() if k != ONEDNN_ISA_CAP[0]}
    for order in ("first", "after"):
        run = subprocess.run([sys.executable, "-c", INVARIANCE_SCRIPT, order], cwd=REPO, env=env,
                             input=json.dumps(TEXTS), capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        got = json.loads(run.stdout.strip().splitlines()[-1])
        assert got["max_diff"] <= (0.0 if got["dtype"] == "bfloat16" else 1e-6), (order, got)
        assert not got["cap_left"]
        if order == "first":
            assert got["onednn"]  # capped in time: oneDNN's kernels stay on


def test_the_in_process_runner_caps_onednn_for_its_process_where_the_encoder_computes_bfloat16_on_a_cpu(
        monkeypatch):
    from pipeline.retrieval.encoder import cap_onednn_for_process

    for device, dtype, capped in (("cpu", "bfloat16", True), ("cpu", "float32", False), ("cuda", "bfloat16", False)):
        monkeypatch.delenv(ONEDNN_ISA_CAP[0], raising=False)
        cap_onednn_for_process(RetrievalConfig(device=device, dtype=dtype))
        assert os.environ.get(ONEDNN_ISA_CAP[0]) == (ONEDNN_ISA_CAP[1] if capped else None), (device, dtype)
    monkeypatch.setenv(ONEDNN_ISA_CAP[0], "ALL")  # the environment's own value is kept
    cap_onednn_for_process(RetrievalConfig(device="cpu", dtype="bfloat16"))
    assert os.environ[ONEDNN_ISA_CAP[0]] == "ALL"
