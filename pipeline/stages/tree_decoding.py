"""Long-form rows in the critique stage: segment-level tree decoding (``selfrag.longform``).

Each row's tree runs as its own coroutine: at every depth it asks the retrieval service for the
open nodes' passages (one call) and the engine service for all their continuations (one call,
keyed by the row id), so many rows' depths are in flight at once and the engine batches them
with everything else. Rows that bring ``ctxs`` reuse them at every depth; the others search
again per segment when ``selfrag.long_form.retrieve_per_segment`` is on. A generation whose
context would not fit the model's window stops its path; the row keeps its best finished path
and records why.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..infra.config import Config
from ..model.vllm_engine import PromptTooLong, check_fits
from ..selfrag.longform import LongFormParams, LongFormResult, LongFormTree
from ..selfrag.scoring import Continuation
from ..selfrag.tokens import RETRIEVAL
from ..services.clients import URGENT, ServiceUnavailable
from .common import effective_task


def is_long_form(task: str | None, cfg: Config) -> bool:
    """Whether a row of this task is decoded as a tree."""
    return cfg.selfrag.long_form.covers(effective_task(task, cfg))


def long_form_params(cfg: Config) -> LongFormParams:
    """The tree parameters from ``selfrag`` and ``selfrag.long_form``."""
    s, lf = cfg.selfrag, cfg.selfrag.long_form
    return LongFormParams(beam_width=lf.beam_width, max_depth=lf.max_depth, weights=s.weights(),
                          threshold=s.threshold if lf.threshold is None else lf.threshold,
                          ignore_cont=lf.ignore_cont, retrieve_per_segment=lf.retrieve_per_segment,
                          top_k=s.top_k)


async def decode_tree(stage, route: str, prompt: str, prompt_ids: list[int], question: str,
                      root_passages: list[dict], own_passages: bool, engine=None,
                      retriever=None) -> tuple[LongFormResult, dict]:
    """Decode one row's tree (the row retrieved at the root) with ``engine`` and ``retriever``
    (None: the stage's); returns the result and counters (depths, generation requests, generations,
    searches)."""
    cfg = stage.cfg
    engine = stage.engine if engine is None else engine
    retriever = stage.retriever if retriever is None else retriever
    budget, stop = cfg.selfrag.long_form.segment_tokens, [stage.ids[RETRIEVAL]]
    tree = LongFormTree(prompt, prompt_ids, question, stage.ids, long_form_params(cfg), stage.tokens, stage.decode,
                        retrieve=True)
    # requests: the tree's generation requests (one per depth with a prompt that fits); a batch's
    # trees send theirs as one engine call per routing key (``same_turn``): stages.engine.calls counts those
    stats = {"depths": 0, "requests": 0, "generations": 0, "searches": 0}
    while not tree.done:
        pending = tree.pending_queries()
        passages = {key: root_passages for key, _ in pending if tree.depth == 1 or own_passages}
        to_search = [(key, query) for key, query in pending if key not in passages]
        if to_search:
            try:
                found = await retriever.search([q for _, q in to_search], cfg.selfrag.top_k)
            except ServiceUnavailable:
                raise
            except Exception:  # noqa: BLE001 - those nodes get no passages: their paths stop there
                found = [[] for _ in to_search]
            passages.update({key: hits for (key, _), hits in zip(to_search, found)})
            stats["searches"] += len(to_search)
        requests = tree.requests(passages)
        results: list = ["prompt too long"] * len(requests)
        fitting = []
        for n, req in enumerate(requests):
            try:
                check_fits(len(req.prompt_ids), budget, cfg.engine.max_model_len)
                fitting.append(n)
            except PromptTooLong:
                pass
        # a sampled [Retrieval] ends the segment: what follows it would be cut and regenerated
        outs = await engine.generate([requests[n].prompt_ids for n in fitting], [budget] * len(fitting),
                                     route, stop, priority=URGENT) if fitting else []
        for n, out in zip(fitting, outs):
            results[n] = out if isinstance(out, Continuation) else f"engine error: {out}"
        stats["depths"] += 1
        stats["requests"] += 1 if fitting else 0
        stats["generations"] += len(fitting)
        tree.advance(results)
    return tree.result(), stats


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


def sum_stats(stats: Sequence[dict]) -> dict:
    """Counters of several trees added up."""
    total: dict = {}
    for s in stats:
        for key, value in s.items():
            total[key] = total.get(key, 0) + value
    return total
