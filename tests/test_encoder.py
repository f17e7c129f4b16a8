"""The encoder: length-bucketed batches, pre-tokenized ids, compute dtypes (packaged MiniLM, CPU)."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.infra.config import ConfigError, RetrievalConfig, load_config
from pipeline.retrieval import encoder as encoder_module
from pipeline.retrieval.encoder import Encoder, length_batches, padded_width, resolve_dtype, tokenize

BF16_HERE = "avx512_bf16" in encoder_module.cpu_flags()  # bfloat16 computed, not emulated
AMX_HERE = "amx_bf16" in encoder_module.cpu_flags()

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


NEEDS_BF16 = pytest.mark.skipif(not BF16_HERE, reason="this CPU would emulate bfloat16")


@pytest.mark.parametrize("dtype, chunked", [("float32", False), (None, False), ("float32", True),
                                            pytest.param("bfloat16", False, marks=NEEDS_BF16),
                                            pytest.param("bfloat16", True, marks=NEEDS_BF16)])
def test_a_query_gets_the_same_vector_in_any_batch(encoder, dtype, chunked):
    """Bit for bit in bfloat16 (where the CPU computes it, not emulated: a padded batch's width
    reordered the top 5 of 12 of 1,600 bench queries); ``chunked``: its products chunked by the
    test (otherwise as the encoder chose: on a CPU with AMX chunked anyway); float32's matrix
    library may change the last bits with the batch's size (seen within 1e-6)."""
    enc = encoder if (dtype, chunked) == ("float32", False) else Encoder(replace(encoder.cfg, dtype=dtype))
    if chunked:
        enc.chunk_query_rows()
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


def test_queries_products_run_in_chunks_of_fixed_rows_and_passages_whole(encoder, monkeypatch):
    enc = Encoder(replace(encoder.cfg, dtype="float32"))
    enc.probed = True
    enc.chunk_query_rows()
    rows, linear = [], torch.nn.functional.linear

    def recording(x, weight, bias=None):
        rows.append(x.reshape(-1, x.shape[-1]).shape[0])
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", recording)
    enc.encode_queries(TEXTS[:5])
    assert len(rows) > 36 and set(rows) == {64}  # 6 layers of 6 products, and the pooler
    rows.clear()
    enc.encode(TEXTS[:5])
    assert rows and 64 not in rows  # 5 passages padded to their longest
    monkeypatch.setattr(enc, "encode_tokens", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        enc.encode_queries(TEXTS[:5])
    assert getattr(enc._encoding_queries, "rows", None) is None  # a failed call leaves passages whole


@pytest.mark.parametrize("shape, bias", [((3, 7, 16), True), ((64, 16), True), ((130, 16), False), ((1, 1, 16), True)])
def test_a_linear_in_row_chunks_is_the_linear(shape, bias):
    layer = torch.nn.Linear(16, 5, bias=bias)
    x = torch.randn(*shape)
    got = encoder_module.linear_in_row_chunks(layer, x, 64)
    assert got.shape == (*shape[:-1], 5)
    torch.testing.assert_close(got, layer(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 7, 384), (64, 384), (130, 384)])
def test_a_bfloat16_linear_with_its_weight_packed_for_the_chunks_is_the_linear(shape):
    """Where oneDNN computes bfloat16 (AVX-512 and up); elsewhere nothing is packed."""
    layer = torch.nn.Linear(384, 96).to(torch.bfloat16)
    with torch.inference_mode():
        packed = encoder_module.pack_for_rows([layer], 64)
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            assert packed == {}
            return
        assert set(packed) == {layer}
        x = torch.randn(*shape).to(torch.bfloat16)
        got = encoder_module.linear_in_row_chunks(layer, x, 64, packed[layer])
        assert got.shape == (*shape[:-1], 96)
        torch.testing.assert_close(got, encoder_module.linear_in_row_chunks(layer, x, 64), rtol=1e-2, atol=1e-2)
    assert encoder_module.pack_for_rows([torch.nn.Linear(384, 96)], 64) == {}  # float32: MKL's, unpacked


@NEEDS_BF16
def test_a_bfloat16_encoders_chunked_queries_get_their_vectors_with_weights_packed_once(encoder):
    """Packed once (``pack_for_rows``) the products are those torch's linear computes: the bench's
    queries got the same bits; here within bfloat16's last bit."""
    enc = Encoder(replace(encoder.cfg, dtype="bfloat16"))
    enc.probed = True
    enc.chunk_query_rows()
    assert set(enc._packed) == {m for m in enc.model.modules() if isinstance(m, torch.nn.Linear)}
    packed = enc.encode_queries(TEXTS)
    enc._packed = {}
    np.testing.assert_allclose(packed, enc.encode_queries(TEXTS), rtol=0, atol=1e-2)
    fp32 = Encoder(replace(encoder.cfg, dtype="float32"))
    fp32.chunk_query_rows()
    assert fp32._packed == {}


def test_an_encoder_told_of_amx_chunks_its_queries_products_and_probes_at_its_first_query(monkeypatch):
    monkeypatch.setattr(encoder_module, "cpu_flags", lambda: {"avx512_bf16", "amx_bf16"})
    told = Encoder(RetrievalConfig(encode_batch_size=8, dtype="bfloat16"))
    assert told.query_row_chunk == encoder_module.QUERY_ROW_CHUNK and not told.probed
    monkeypatch.setattr(encoder_module, "cpu_flags", lambda: {"avx512_bf16"})
    fp32 = Encoder(RetrievalConfig(encode_batch_size=8, dtype="float32"))
    assert fp32.query_row_chunk is None and not fp32.probed
    fp32.encode(TEXTS[:3])
    assert not fp32.probed  # passages need no probe
    fp32.encode_queries(TEXTS[:3])
    assert fp32.probed and fp32.cpu_seconds > 0


@NEEDS_BF16
def test_the_probe_keeps_a_query_the_same_in_any_batch_where_the_encoder_is_not_told_of_amx(monkeypatch):
    """Not told of AMX, a bfloat16 encoder's probe finds AMX's kernels changing a query's vector
    with its batch and chunks the products (this AMX machine did); oneDNN stays on."""
    monkeypatch.setattr(encoder_module, "cpu_flags", lambda: {"avx512_bf16"})
    enc = Encoder(RetrievalConfig(encode_batch_size=8, dtype="bfloat16"))
    onednn = torch.backends.mkldnn.enabled
    enc.check_batch_invariance()
    alone = np.concatenate([enc.encode_queries([text]) for text in TEXTS])
    np.testing.assert_array_equal(enc.encode_queries(TEXTS[::-1])[::-1], alone, err_msg=f"chunk {enc.query_row_chunk}")
    assert torch.backends.mkldnn.enabled == onednn


def probe_log(enc: Encoder) -> list:
    """The encoder module's log records while ``enc.check_batch_invariance`` runs."""
    import logging

    records, handler = [], logging.Handler()
    handler.emit = records.append
    encoder_module.log.addHandler(handler)
    try:
        enc.check_batch_invariance()
    finally:
        encoder_module.log.removeHandler(handler)
    return records


def test_a_float32_encoder_whose_queries_change_with_their_batch_even_chunked_warns(monkeypatch):
    enc = Encoder(RetrievalConfig(encode_batch_size=8, dtype="float32"))
    calls = []

    def batch_dependent(texts):
        calls.append(len(texts))
        return np.full((len(texts), 4), 1.0 + 1e-7 * len(texts), dtype=np.float32)

    monkeypatch.setattr(enc, "encode_queries", batch_dependent)
    enc.cpu_seconds, onednn = 1.5, torch.backends.mkldnn.enabled
    records = probe_log(enc)
    assert calls == ([1] * 8 + [8]) * 2  # probed, chunked, probed again; the larger batch not reached
    assert enc.query_row_chunk == 64 and enc.probed and enc.cpu_seconds == 1.5
    assert torch.backends.mkldnn.enabled == onednn  # nothing to turn off in float32
    assert "float32 vectors change in their last bits with their batch" in records[-1].getMessage()


def test_a_bfloat16_encoder_whose_queries_change_with_their_batch_turns_onednn_off_and_then_refuses(monkeypatch):
    monkeypatch.setattr(encoder_module, "cpu_flags", lambda: {"avx512_bf16"})
    enc = Encoder(RetrievalConfig(encode_batch_size=8, dtype="bfloat16"))
    monkeypatch.setattr(enc, "_queries_invariant", lambda: False)
    onednn = torch.backends.mkldnn.enabled
    try:
        with pytest.raises(RuntimeError, match="change with their batch on this CPU in bfloat16; set retrieval.dtype: float32"):
            probe_log(enc)
        assert not torch.backends.mkldnn.enabled and enc.query_row_chunk == 64
        assert enc._packed == {}  # packed products are oneDNN's
        torch.backends.mkldnn.enabled, enc.query_row_chunk = True, None
        monkeypatch.setattr(enc, "_queries_invariant", iter([False, False, True]).__next__)
        records = probe_log(enc)  # chunking did not help, oneDNN off did
        assert not torch.backends.mkldnn.enabled and enc.query_row_chunk == 64
        assert "oneDNN kernels are turned off" in records[-1].getMessage()
    finally:
        torch.backends.mkldnn.enabled = onednn


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
