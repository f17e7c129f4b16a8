"""The output columns every stage reads and writes, and the bookkeeping columns, with fixed
Arrow types: the output's schema.

Plain data (pyarrow only), so that the stages, the staging of rows, the preflight checks and
the export of a finished output all share one definition; ``pipeline.stages.columns`` adds the
helpers the stages set and read columns with.
"""

from __future__ import annotations

import pyarrow as pa

F64 = pa.float64()

PASSAGE_TYPE = pa.struct([
    ("id", pa.string()), ("title", pa.string()), ("text", pa.string()), ("retrieval_score", F64),
])

CANDIDATE_TYPE = pa.struct([
    ("passage_id", pa.string()),
    ("raw", pa.string()),
    ("answer", pa.string()),
    ("s_rel", F64), ("s_sup", F64), ("s_use", F64), ("seq", F64), ("final", F64),
    ("error", pa.string()),
    # Only with output.keep_logprobs: the engine's raw record behind the scores.
    ("token_ids", pa.list_(pa.int32())),
    ("cumulative_logprob", F64),
    ("reflection_logprobs", pa.list_(pa.list_(F64))),
])

SEGMENT_TYPE = pa.struct([
    ("text", pa.string()), ("raw", pa.string()), ("passage_id", pa.string()), ("citation", pa.int32()),
    ("s_rel", F64), ("s_sup", F64), ("s_use", F64), ("score", F64), ("path_score", F64), ("depth", pa.int32()),
    # Only with output.keep_logprobs: the whole generation the segment was cut from.
    ("token_ids", pa.list_(pa.int32())),
    ("cumulative_logprob", F64),
    ("reflection_logprobs", pa.list_(pa.list_(F64))),
])

#: Output columns added to every input row, in output order.
OUTPUT_TYPES: dict[str, pa.DataType] = {
    "prompt": pa.string(),
    "retrieval_prob": F64,
    "retrieved": pa.bool_(),
    "passages": pa.list_(PASSAGE_TYPE),
    "candidates": pa.list_(CANDIDATE_TYPE),
    "answer": pa.string(),
    "answer_raw": pa.string(),
    # Only with output.keep_logprobs: token ids of the generation behind the answer (the first
    # pass's, or the chosen candidate's), e.g. to check it ends with a utility token and </s>.
    "answer_token_ids": pa.list_(pa.int32()),
    "best_passage_id": pa.string(),
    # Long-form rows decoded as a tree: the chosen path's segments, each kept segment's
    # citation number (null: none), the cited passages (``[n]`` is docs[n-1]), the number of
    # segments on the path before empty or repeated ones were dropped, and why a path stopped
    # early (e.g. a context that would exceed the model's window).
    "segments": pa.list_(SEGMENT_TYPE),
    "citations": pa.list_(pa.int32()),
    "docs": pa.list_(PASSAGE_TYPE),
    "path_depth": pa.int32(),
    "stop_reason": pa.string(),
    # Rows that bring ctxs: entries dropped as unusable (null, or null/empty text).
    "ctxs_dropped": pa.int32(),
    "error": pa.string(),
    "model": pa.string(),
    "run_id": pa.string(),
}

#: Bookkeeping columns, dropped when writing: source shard, row offset within it, and the
#: prompt as token ids (tokenized once, in the prepare stage).
SHARD, OFFSET, PROMPT_IDS = "_shard", "_offset", "_prompt_ids"
INTERNAL_TYPES: dict[str, pa.DataType] = {SHARD: pa.string(), OFFSET: pa.int64(), PROMPT_IDS: pa.list_(pa.int32())}

ALL_TYPES = {**OUTPUT_TYPES, **INTERNAL_TYPES}
