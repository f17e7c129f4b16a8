"""First pass: the retrieval decision, and the answer for rows that need no evidence.

Adaptive mode reads P([Retrieval]) and P([No Retrieval]) at the first generated position (one
token per prompt). A row that needs no evidence is then answered from ``prompt + [No
Retrieval]``; the others leave with ``retrieved = true`` and no answer yet. A batch's rows are
grouped by routing key (a hash of the row id): one engine call per group for the decisions and
one for the answers, all groups at once.
"""

from __future__ import annotations

import asyncio

import pyarrow as pa

from ..runtime import phases
from ..infra.config import Config
from ..model.vllm_engine import PromptTooLong, check_fits
from ..selfrag.scoring import decide_retrieval, retrieval_probability
from ..selfrag.selection import short_form_answer
from ..services.clients import FIRST_PASS
from .columns import INTERNAL_TYPES, OFFSET, OUTPUT_TYPES, PROMPT_IDS, SHARD
from .common import ServiceStage, StageLogic, by_route, max_new_tokens, route_keys
from .contract import ANY, Contract

WRITES = ("retrieval_prob", "retrieved", "answer", "answer_raw", "answer_token_ids", "candidates", "error")


class FirstPass(StageLogic):
    """Decide retrieval for each valid row and answer those that need no evidence."""

    name = "first_pass"

    @staticmethod
    def contract(cfg: Config) -> Contract:
        return Contract("first_pass", reads={SHARD: INTERNAL_TYPES[SHARD], OFFSET: INTERNAL_TYPES[OFFSET],
                                             cfg.input.task_column: ANY, PROMPT_IDS: INTERNAL_TYPES[PROMPT_IDS],
                                             "error": pa.string()},
                        writes={name: OUTPUT_TYPES[name] for name in WRITES}, optional=frozenset({cfg.input.task_column}))

    async def process(self, view) -> dict:
        phases.reached("first_batch")  # test hook: a first-pass actor has a batch
        cfg, n = self.cfg, view.num_rows
        prompts, errors = view[PROMPT_IDS], view["error"]
        tasks = view[cfg.input.task_column]
        out = {name: [None] * n for name in WRITES}
        out["error"] = errors
        budgets = [max_new_tokens(t, cfg) for t in tasks]
        direct = [None if p is None else self.tokens.no_evidence(p) for p in prompts]
        valid = []
        for i in range(n):
            if errors[i] is not None:
                continue
            try:
                check_fits(len(direct[i]), budgets[i], cfg.engine.max_model_len)
                valid.append(i)
            except PromptTooLong as exc:
                errors[i] = str(exc)

        async def group(route: str, rows: list[int]) -> None:
            """One engine call for the decisions of a route's rows, one for their direct answers."""
            if cfg.selfrag.mode == "adaptive":
                firsts = await self.engine.generate([prompts[i] for i in rows], [1] * len(rows), route,
                                                    priority=FIRST_PASS)
                for i, first in zip(rows, firsts):
                    if isinstance(first, str):
                        errors[i] = f"engine error: {first}"
                        continue
                    out["retrieval_prob"][i] = retrieval_probability(first.logprobs[0] if first.logprobs else {},
                                                                     self.ids, cfg.selfrag.retrieval_rule)
            rows = [i for i in rows if errors[i] is None]
            for i in rows:
                out["retrieved"][i] = decide_retrieval(cfg.selfrag.mode, out["retrieval_prob"][i],
                                                       cfg.selfrag.threshold)
            answering = [i for i in rows if not out["retrieved"][i]]
            if not answering:
                return
            answers = await self.engine.generate([direct[i] for i in answering], [budgets[i] for i in answering], route,
                                                 priority=FIRST_PASS)
            for i, answer in zip(answering, answers):
                if isinstance(answer, str):
                    errors[i] = f"engine error: {answer}"
                    continue
                out["answer_raw"][i], out["answer"][i], out["candidates"][i] = answer.text, short_form_answer(answer.text), []
                if cfg.output.keep_logprobs:
                    out["answer_token_ids"][i] = answer.token_ids

        groups = by_route(route_keys(view, cfg), valid)
        await asyncio.gather(*(group(route, rows) for route, rows in groups.items()))
        view.set(**out)
        return {}  # the engine calls are counted by ServiceStage


class FirstPassStage(ServiceStage):
    """Ray Data actor running ``FirstPass`` against the engine service."""

    logic = FirstPass
