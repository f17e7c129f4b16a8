"""Critique-rank stage (vLLM actor pool): one continuation per passage, scored by the model's
own reflection-token probabilities; the best candidate (closed-set tasks: the best summed
answer) becomes the row's answer."""

from __future__ import annotations

import pyarrow as pa

from ..config import Config
from ..engine import PromptTooLong
from ..selfrag.prompts import CLOSED_SET_TASKS
from ..selfrag.scoring import Continuation, score_continuation
from ..selfrag.selection import clean_answer, select_answer
from ..selfrag.tokens import ALL_REFLECTION_TOKENS
from .columns import PROMPT_IDS, column, set_columns
from .common import EngineStage, effective_task, max_new_tokens, run_isolated
from .long_form import decode_trees, is_long_form, result_columns


def logprob_record(cont: Continuation, reflection_ids: list[int]) -> dict:
    """The engine's raw record of a candidate: token ids, cumulative logprob, and per position
    the logprobs of the 15 reflection tokens (in ``ALL_REFLECTION_TOKENS`` order; null = not returned)."""
    return {
        "token_ids": cont.token_ids,
        "cumulative_logprob": cont.cumulative_logprob,
        "reflection_logprobs": [[pos.get(t) for t in reflection_ids] for pos in cont.logprobs],
    }


class Critique(EngineStage):
    """Callable class for ``map_batches``: one engine replica per actor. Long-form rows are
    decoded as trees here too (with a retriever of its own for per-segment searches)."""

    stage = "critique"
    _retriever = None

    def search(self, queries: list[str]) -> list[list[dict]]:
        """Index search for long-form segments (the retriever is loaded on first use)."""
        if self._retriever is None:
            from ..retrieval.index import Retriever

            self._retriever = Retriever(self.cfg.retrieval)
        return self._retriever.search(queries, self.cfg.selfrag.top_k)

    def process(self, batch: pa.Table) -> pa.Table:
        """Generate, score and select the candidates of the rows that retrieved."""
        cfg, engine, tokens = self.cfg, self.engine, self.tokens
        prompts, errors = column(batch, PROMPT_IDS), column(batch, "error")
        tasks = [effective_task(t, cfg) if e is None else None
                 for t, e in zip(column(batch, cfg.input.task_column), errors)]
        passages, candidates = column(batch, "passages"), column(batch, "candidates")
        answers, raws, best_ids = column(batch, "answer"), column(batch, "answer_raw"), column(batch, "best_passage_id")
        token_ids = column(batch, "answer_token_ids")

        jobs = []  # (row, candidate index, prompt, budget)
        selecting = []  # rows whose candidates this batch scores
        trees = []  # long-form rows
        for i, (retrieved, error) in enumerate(zip(column(batch, "retrieved"), errors)):
            if not retrieved or error is not None:
                continue
            if not passages[i]:
                errors[i] = "retrieval returned no passages"
                continue
            if is_long_form(tasks[i], cfg):
                trees.append(i)
                continue
            candidates[i] = []
            selecting.append(i)
            budget = max_new_tokens(tasks[i], cfg)
            for j, passage in enumerate(passages[i]):
                candidates[i].append({"passage_id": passage.get("id")})
                prompt = tokens.evidence(prompts[i], passage.get("title"), passage.get("text"))
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
            best_ids[i], token_ids[i] = scored[chosen.index]["passage_id"], scored[chosen.index].get("token_ids")

        values = {"candidates": candidates, "answer": answers, "answer_raw": raws, "answer_token_ids": token_ids,
                  "best_passage_id": best_ids, "error": errors}
        if trees:
            values.update(self.decode_long_form(batch, trees, answers, raws, errors))
        return set_columns(batch, values)

    def decode_long_form(self, batch: pa.Table, rows: list[int], answers: list, raws: list, errors: list) -> dict:
        """Tree-decode the long-form rows; their answers, segments, citations and docs."""
        cfg = self.cfg
        questions, ctxs = column(batch, cfg.input.question_column), column(batch, cfg.input.ctxs_column)
        prompts, prompt_ids, passages = column(batch, "prompt"), column(batch, PROMPT_IDS), column(batch, "passages")
        results, stats = decode_trees(self.engine, self.tokens, self.tokenizer, cfg,
                                      [(prompts[i], prompt_ids[i]) for i in rows], [questions[i] for i in rows],
                                      [passages[i] for i in rows], [bool(ctxs[i]) for i in rows], self.search)
        self.reporter.report(**{f"long_form_{k}": v for k, v in stats.items()}, long_form_rows=len(rows))
        out = {name: column(batch, name) for name in ("segments", "citations", "docs", "path_depth", "stop_reason")}
        reflection_ids = self.engine.ids.ids(ALL_REFLECTION_TOKENS)
        record = (lambda cont: logprob_record(cont, reflection_ids)) if cfg.output.keep_logprobs else None
        for i, result in zip(rows, results):
            values = result_columns(result, record)
            if not result.text:
                errors[i] = f"long-form decoding produced no answer: {result.stop_reason or 'empty output'}"
            answers[i], raws[i] = values.pop("answer"), values.pop("answer_raw")
            for name, value in values.items():
                out[name][i] = value
        return out
