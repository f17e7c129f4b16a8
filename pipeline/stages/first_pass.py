"""First pass (vLLM actor pool): the retrieval decision, and the answer for rows that need no evidence.

Adaptive mode reads P([Retrieval]) and P([No Retrieval]) at the first generated position (one
token per prompt). Rows that need no evidence are then answered from ``prompt + "[No
Retrieval]"``; the others leave this stage with ``retrieved = true`` and no answer yet.
"""

from __future__ import annotations

import pyarrow as pa

from ..config import Config
from ..engine import PromptTooLong
from ..selfrag.scoring import decide_retrieval, retrieval_probability
from ..selfrag.selection import clean_answer
from .columns import PROMPT_IDS, column, set_columns
from .common import EngineStage, max_new_tokens, run_isolated


class FirstPass(EngineStage):
    """Callable class for ``map_batches``: one engine replica per actor."""

    stage = "first_pass"

    def process(self, batch: pa.Table) -> pa.Table:
        """Decide retrieval for each valid row and answer those that need no evidence."""
        cfg, engine, tokens = self.cfg, self.engine, self.tokens
        n = batch.num_rows
        prompts, errors = column(batch, PROMPT_IDS), column(batch, "error")
        budgets = [max_new_tokens(t, cfg) if e is None else 0
                   for t, e in zip(column(batch, cfg.input.task_column), errors)]
        probs, retrieved = [None] * n, [None] * n
        answers, raws, candidates, token_ids = [None] * n, [None] * n, [None] * n, [None] * n

        active = []
        for i in range(n):
            if errors[i] is not None:
                continue
            try:
                engine.check_fits(tokens.no_evidence(prompts[i]), budgets[i])
                active.append(i)
            except PromptTooLong as exc:
                errors[i] = str(exc)

        mode = cfg.selfrag.mode
        if mode == "adaptive":
            firsts = run_isolated(lambda ps: engine.generate(ps, 1), [prompts[i] for i in active])
            for i, cont in zip(active, firsts):
                if isinstance(cont, Exception):
                    errors[i] = f"engine error: {cont}"
                    continue
                first = cont.logprobs[0] if cont.logprobs else {}
                probs[i] = retrieval_probability(first, engine.ids, cfg.selfrag.retrieval_rule)
        for i in active:
            if errors[i] is None:
                retrieved[i] = decide_retrieval(mode, probs[i], cfg.selfrag.threshold)

        direct = [i for i in active if retrieved[i] is False]
        outs = run_isolated(
            lambda idx: engine.generate([tokens.no_evidence(prompts[i]) for i in idx], [budgets[i] for i in idx]),
            direct,
        )
        for i, cont in zip(direct, outs):
            if isinstance(cont, Exception):
                errors[i] = f"engine error: {cont}"
                continue
            raws[i], answers[i], candidates[i] = cont.text, clean_answer(cont.text), []
            if cfg.output.keep_logprobs:
                token_ids[i] = cont.token_ids

        return set_columns(batch, {
            "retrieval_prob": probs, "retrieved": retrieved, "answer": answers,
            "answer_raw": raws, "answer_token_ids": token_ids, "candidates": candidates, "error": errors,
        })
