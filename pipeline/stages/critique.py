"""Critique-rank stage (vLLM actor pool): one continuation per passage, scored by the model's
own reflection-token probabilities; the best candidate (closed-set tasks: the best summed
answer) becomes the row's answer."""

from __future__ import annotations

import pyarrow as pa

from ..config import Config
from ..engine import PromptTooLong
from ..selfrag.prompts import CLOSED_SET_TASKS, evidence_prompt
from ..selfrag.scoring import Continuation, score_continuation
from ..selfrag.selection import clean_answer, select_answer
from ..selfrag.tokens import ALL_REFLECTION_TOKENS
from .columns import column, set_columns
from .common import EngineStage, effective_task, max_new_tokens, run_isolated


def logprob_record(cont: Continuation, reflection_ids: list[int]) -> dict:
    """The engine's raw record of a candidate: token ids, cumulative logprob, and per position
    the logprobs of the 15 reflection tokens (in ``ALL_REFLECTION_TOKENS`` order; null = not returned)."""
    return {
        "token_ids": cont.token_ids,
        "cumulative_logprob": cont.cumulative_logprob,
        "reflection_logprobs": [[pos.get(t) for t in reflection_ids] for pos in cont.logprobs],
    }


class Critique(EngineStage):
    """Callable class for ``map_batches``: one engine replica per actor."""

    stage = "critique"

    def process(self, batch: pa.Table) -> pa.Table:
        """Generate, score and select the candidates of the rows that retrieved."""
        cfg, engine = self.cfg, self.engine
        prompts, errors = column(batch, "prompt"), column(batch, "error")
        tasks = [effective_task(t, cfg) if e is None else None
                 for t, e in zip(column(batch, cfg.input.task_column), errors)]
        passages, candidates = column(batch, "passages"), column(batch, "candidates")
        answers, raws, best_ids = column(batch, "answer"), column(batch, "answer_raw"), column(batch, "best_passage_id")

        jobs = []  # (row, candidate index, prompt, budget)
        selecting = []  # rows whose candidates this batch scores
        for i, (retrieved, error) in enumerate(zip(column(batch, "retrieved"), errors)):
            if not retrieved or error is not None:
                continue
            if not passages[i]:
                errors[i] = "retrieval returned no passages"
                continue
            candidates[i] = []
            selecting.append(i)
            budget = max_new_tokens(tasks[i], cfg)
            for j, passage in enumerate(passages[i]):
                candidates[i].append({"passage_id": passage.get("id")})
                prompt = evidence_prompt(prompts[i], passage.get("title"), passage.get("text"))
                try:
                    engine.check_fits(prompt, budget)
                    jobs.append((i, j, prompt, budget))
                except PromptTooLong as exc:
                    candidates[i][j]["error"] = str(exc)

        outs = run_isolated(lambda js: engine.generate([p for _, _, p, _ in js], [b for *_, b in js]), jobs)
        for (i, j, _, _), cont in zip(jobs, outs):
            cand = candidates[i][j]
            if isinstance(cont, Exception):
                cand["error"] = f"engine error: {cont}"
                continue
            scores = score_continuation(cont, engine.ids, cfg.selfrag.weights())
            cand.update(raw=cont.text, answer=clean_answer(cont.text), s_rel=scores.s_rel, s_sup=scores.s_sup,
                        s_use=scores.s_use, seq=scores.seq, final=scores.final)
            if cfg.output.keep_logprobs:
                cand.update(logprob_record(cont, engine.ids.ids(ALL_REFLECTION_TOKENS)))

        for i in selecting:
            scored = [c for c in candidates[i] if c.get("final") is not None]
            if not scored:
                errors[i] = "no candidate could be generated: " + "; ".join(
                    sorted({c.get("error") or "unknown" for c in candidates[i]}))
                continue
            chosen = select_answer([c["answer"] for c in scored], [c["final"] for c in scored],
                                   closed_set=tasks[i] in CLOSED_SET_TASKS)
            answers[i], raws[i] = chosen.answer, scored[chosen.index]["raw"]
            best_ids[i] = scored[chosen.index]["passage_id"]

        return set_columns(batch, {"candidates": candidates, "answer": answers, "answer_raw": raws,
                                   "best_passage_id": best_ids, "error": errors})
