"""Long-form rows in the critique stage: tree decoding batched across rows, one depth at a time.

Every depth costs one retrieval call (the nodes that need fresh passages, all rows together)
and one engine call (every (node, passage) generation of every row at that depth). Rows that
bring ``ctxs`` reuse them at every depth; the others search the index again per segment
when ``selfrag.long_form.retrieve_per_segment`` is on. A generation whose context would not
fit the model's window stops its path; the row keeps its best finished path and records why.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..config import Config
from ..engine import Engine, PromptTooLong
from ..selfrag.prompts import PromptTokens
from ..selfrag.longform import LongFormParams, LongFormResult, LongFormTree
from ..selfrag.scoring import Continuation
from ..selfrag.tokens import RETRIEVAL
from .common import effective_task, run_isolated

Search = Callable[[list[str]], list[list[dict]]]


def is_long_form(task: str | None, cfg: Config) -> bool:
    """Whether a row of this task is decoded as a tree."""
    lf = cfg.selfrag.long_form
    return lf.enabled and ("*" in lf.tasks or effective_task(task, cfg) in lf.tasks)


def long_form_params(cfg: Config) -> LongFormParams:
    """The tree parameters from ``selfrag`` and ``selfrag.long_form``."""
    s, lf = cfg.selfrag, cfg.selfrag.long_form
    return LongFormParams(beam_width=lf.beam_width, max_depth=lf.max_depth, weights=s.weights(),
                          threshold=s.threshold if lf.threshold is None else lf.threshold,
                          ignore_cont=lf.ignore_cont, retrieve_per_segment=lf.retrieve_per_segment,
                          top_k=s.top_k)


def decode_trees(engine: Engine, tokens: PromptTokens, tokenizer, cfg: Config,
                 prompts: Sequence[tuple[str, list[int]]], questions: Sequence[str],
                 root_passages: Sequence[list[dict]], own_passages: Sequence[bool],
                 search: Search) -> tuple[list[LongFormResult], dict]:
    """Decode one tree per row (all of which retrieved at the root), from its prompt (text and
    token ids); returns the results and counters (depths, engine calls, generations, retrieval queries)."""
    params, budget = long_form_params(cfg), cfg.selfrag.long_form.segment_tokens
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    stop = [engine.ids[RETRIEVAL]]
    trees = [LongFormTree(text, ids, q, engine.ids, params, tokens, decode, retrieve=True)
             for (text, ids), q in zip(prompts, questions)]
    stats = {"depths": 0, "engine_calls": 0, "generations": 0, "searches": 0}
    while not all(t.done for t in trees):
        open_rows = [r for r, t in enumerate(trees) if not t.done]
        passages: dict[int, dict] = {r: {} for r in open_rows}
        to_search = []  # (row, node key, query)
        for r in open_rows:
            for key, query in trees[r].pending_queries():
                if trees[r].depth == 1 or own_passages[r]:
                    passages[r][key] = root_passages[r]
                else:
                    to_search.append((r, key, query))
        if to_search:
            found = run_isolated(search, [q for *_, q in to_search])
            stats["searches"] += len(to_search)
            for (r, key, _), hits in zip(to_search, found):
                passages[r][key] = [] if isinstance(hits, Exception) else hits
        requests = [(r, req) for r in open_rows for req in trees[r].requests(passages[r])]
        results: list = [None] * len(requests)
        fitting = []
        for n, (_, req) in enumerate(requests):
            try:
                engine.check_fits(req.prompt_ids, budget)
                fitting.append(n)
            except PromptTooLong:
                results[n] = "prompt too long"
        # a sampled [Retrieval] ends the segment: what follows it would be cut and regenerated
        outs = run_isolated(lambda ns: engine.generate([requests[n][1].prompt_ids for n in ns], budget, stop),
                            fitting)
        for n, out in zip(fitting, outs):
            results[n] = f"engine error: {out}" if isinstance(out, Exception) else out
        stats["depths"] += 1
        stats["engine_calls"] += 1 if fitting else 0
        stats["generations"] += len(fitting)
        for r in open_rows:
            trees[r].advance([res for (row, _), res in zip(requests, results) if row == r])
    return [t.result() for t in trees], stats


def result_columns(result: LongFormResult, record: Callable[[Continuation], dict] | None) -> dict:
    """A tree's result as the row's output values; ``record`` (with ``output.keep_logprobs``)
    adds each segment's engine record (the whole generation it was cut from)."""
    docs = [{"id": d.get("id"), "title": d.get("title"), "text": d.get("text"),
             "retrieval_score": d.get("retrieval_score")} for d in result.docs]
    segments = []
    for seg in result.segments:
        seg = dict(seg)
        cont = seg.pop("continuation")
        segments.append({**seg, **(record(cont) if record and cont is not None else {})})
    return {"answer": result.text, "answer_raw": result.raw, "segments": segments,
            "citations": result.citations, "docs": docs, "path_depth": result.depth,
            "stop_reason": result.stop_reason}
