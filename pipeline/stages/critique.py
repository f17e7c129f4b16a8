"""Critique-rank: one continuation per passage, scored by the model's own reflection-token
probabilities; the best candidate (closed-set tasks: the best summed answer) becomes the row's
answer. Long-form rows are decoded as trees (``tree_decoding``). A batch's short-form rows are
grouped by routing key (a hash of the row id), one engine call per group with all their
candidates; each long-form row is its own coroutine. All of it is in flight at once.
"""

from __future__ import annotations

import asyncio

import pyarrow as pa

from ..infra.config import Config
from ..model.vllm_engine import PromptTooLong, check_fits
from ..selfrag.prompts import CLOSED_SET_TASKS
from ..selfrag.scoring import Continuation, score_continuation
from ..selfrag.selection import select_answer, short_form_answer
from ..selfrag.tokens import ALL_REFLECTION_TOKENS
from ..services.clients import ServiceUnavailable
from .columns import INTERNAL_TYPES, OFFSET, OUTPUT_TYPES, PROMPT_IDS, SHARD
from .common import ServiceStage, StageLogic, by_route, effective_task, max_new_tokens, route_keys
from .contract import ANY, Contract
from .same_turn import TurnBatchedEngine, TurnBatchedRetriever
from .tree_decoding import decode_tree, is_long_form, result_columns, sum_stats

WRITES = ("candidates", "answer", "answer_raw", "answer_token_ids", "best_passage_id", "segments", "citations",
          "docs", "path_depth", "stop_reason", "error")


def logprob_record(cont: Continuation, reflection_ids: list[int]) -> dict:
    """The engine's raw record of a candidate: token ids, cumulative logprob, and per position
    the logprobs of the 15 reflection tokens (in ``ALL_REFLECTION_TOKENS`` order; null = not returned)."""
    return {
        "token_ids": cont.token_ids,
        "cumulative_logprob": cont.cumulative_logprob,
        "reflection_logprobs": [[pos.get(t) for t in reflection_ids] for pos in cont.logprobs],
    }


class Critique(StageLogic):
    """Generate, score and select the candidates of the rows that retrieved; tree-decode the
    long-form ones."""

    name = "critique"

    @staticmethod
    def contract(cfg: Config) -> Contract:
        i = cfg.input
        reads = {SHARD: INTERNAL_TYPES[SHARD], OFFSET: INTERNAL_TYPES[OFFSET], i.task_column: ANY,
                 i.question_column: ANY, i.ctxs_column: ANY, "prompt": pa.string(),
                 PROMPT_IDS: INTERNAL_TYPES[PROMPT_IDS], "retrieved": pa.bool_(),
                 "passages": OUTPUT_TYPES["passages"], "error": pa.string()}
        return Contract("critique", reads=reads, writes={name: OUTPUT_TYPES[name] for name in WRITES},
                        optional=frozenset({i.task_column, i.ctxs_column}))

    async def process(self, view) -> dict:
        cfg = self.cfg
        names = (cfg.input.task_column, cfg.input.question_column, "prompt", PROMPT_IDS,
                 "retrieved", "passages", "error")
        rows = [dict(zip(names, values)) for values in zip(*(view[name] for name in names))]
        own_passages = view.non_empty(cfg.input.ctxs_column)  # the row brought its own (ctxs): read as lengths
        out = {name: view[name] for name in WRITES}
        short, trees = [], []
        for i, r in enumerate(rows):
            if not r["retrieved"] or r["error"] is not None:
                continue
            r["task"] = effective_task(r[cfg.input.task_column], cfg)
            if not r["passages"]:
                out["error"][i] = "retrieval returned no passages"
            else:
                (trees if is_long_form(r["task"], cfg) else short).append(i)
        routes = route_keys(view, cfg)
        groups = by_route(routes, short)
        tree_stats = []
        # the batch's trees search together and generate together: at each depth one search, and
        # one engine call per routing key (``same_turn``)
        engine = TurnBatchedEngine(self.engine, fatal=(ServiceUnavailable,))
        retriever = TurnBatchedRetriever(self.retriever, fatal=(ServiceUnavailable,))

        async def tree(i: int) -> None:
            r = rows[i]
            result, stats = await decode_tree(self, routes[i], r["prompt"], r[PROMPT_IDS],
                                              r[cfg.input.question_column], r["passages"], own_passages[i],
                                              engine, retriever)
            tree_stats.append(stats)
            self.set_long_form(out, i, result)

        await asyncio.gather(*(self.rank(out, [(i, rows[i]) for i in group], route) for route, group in groups.items()),
                             *(tree(i) for i in trees))
        view.set(**out)
        stats = {}  # the engine calls (trees' included) are counted by ServiceStage
        if tree_stats:
            stats.update({f"long_form_{k}": v for k, v in sum_stats(tree_stats).items()}, long_form_rows=len(trees))
        return stats

    async def rank(self, out: dict, rows: list[tuple[int, dict]], route: str) -> None:
        """One continuation per passage of each row, in one engine call; each row's candidates
        are scored and the selected one becomes its answer."""
        cfg = self.cfg
        candidates, prompts = {}, []  # prompts: (row index, candidate, token ids, budget)
        for i, r in rows:
            budget = max_new_tokens(r["task"], cfg)
            candidates[i] = []
            for passage in r["passages"]:
                cand = {"passage_id": passage.get("id")}
                candidates[i].append(cand)
                prompt = self.tokens.evidence(r[PROMPT_IDS], passage.get("title"), passage.get("text"))
                try:
                    check_fits(len(prompt), budget, cfg.engine.max_model_len)
                    prompts.append((i, cand, prompt, budget))
                except PromptTooLong as exc:
                    cand["error"] = str(exc)
        outs = await self.engine.generate([p for _, _, p, _ in prompts], [b for *_, b in prompts], route) \
            if prompts else []
        reflection_ids = self.ids.ids(ALL_REFLECTION_TOKENS)
        for (_, cand, _, _), cont in zip(prompts, outs):
            if isinstance(cont, str):
                cand["error"] = f"engine error: {cont}"
                continue
            s = score_continuation(cont, self.ids, cfg.selfrag.weights())
            cand.update(raw=cont.text, answer=short_form_answer(cont.text), s_rel=s.s_rel, s_sup=s.s_sup,
                        s_use=s.s_use, seq=s.seq, final=s.final)
            if cfg.output.keep_logprobs:
                cand.update(logprob_record(cont, reflection_ids))
        for i, r in rows:
            self.select(out, i, r["task"], candidates[i])

    @staticmethod
    def select(out: dict, i: int, task: str | None, candidates: list[dict]) -> None:
        """The row's candidates, and its answer from the best of them (an error if none was generated)."""
        out["candidates"][i] = candidates
        scored = [c for c in candidates if c.get("final") is not None]
        if not scored:
            out["error"][i] = "no candidate could be generated: " + "; ".join(
                sorted({c.get("error") or "unknown" for c in candidates}))
            return
        chosen = select_answer([c["answer"] for c in scored], [c["final"] for c in scored],
                               closed_set=task in CLOSED_SET_TASKS)
        best = scored[chosen.index]
        out["answer"][i], out["answer_raw"][i] = chosen.answer, best["raw"]
        out["best_passage_id"][i], out["answer_token_ids"][i] = best["passage_id"], best.get("token_ids")

    def set_long_form(self, out: dict, i: int, result) -> None:
        """A tree's result into the row's output columns."""
        reflection_ids = self.ids.ids(ALL_REFLECTION_TOKENS)
        record = (lambda cont: logprob_record(cont, reflection_ids)) if self.cfg.output.keep_logprobs else None
        for name, value in result_columns(result, record).items():
            out[name][i] = value
        if not result.text:
            out["error"][i] = f"long-form decoding produced no answer: {result.stop_reason or 'empty output'}"
            out["answer"][i] = None


class CritiqueStage(ServiceStage):
    """Ray Data actor running ``Critique`` against the engine and retrieval services."""

    logic = Critique
