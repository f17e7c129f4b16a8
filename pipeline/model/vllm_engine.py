"""vLLM, as the engine service and the benchmarks use it: engine arguments from the config,
the sampling parameters of every Self-RAG generation, and plain records (``Continuation``).

Prompts are token ids (``TokensPrompt``): vLLM never tokenizes text, so nothing in a question
or passage can become a control token. Every generation is greedy and asks vLLM for the
logprobs of exactly the 15 reflection tokens at every generated position
(``SamplingParams(logprob_token_ids=...)``): exact, and far cheaper than whole-vocabulary
logprobs. ``Engine`` is a synchronous engine in this process, for tests of the model and for
the benchmark's bare-engine and per-query baselines; the job itself uses the engine service
(``pipeline.services.engine``).
"""

from __future__ import annotations

import os
from typing import Sequence

from ..infra.config import EngineConfig
from ..selfrag.scoring import Continuation
from ..selfrag.tokens import ReflectionIds


class PromptTooLong(ValueError):
    """A prompt that leaves no room for its new-token budget in the model's context."""


def check_fits(prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """Raise PromptTooLong unless prompt_tokens + max_tokens fit in max_model_len."""
    if prompt_tokens + max_tokens > max_model_len:
        raise PromptTooLong(f"prompt is {prompt_tokens} tokens; with {max_tokens} new tokens it exceeds "
                            f"max_model_len={max_model_len}")


def engine_kwargs(cfg: EngineConfig) -> dict:
    """vLLM engine arguments (besides the model path) from the config; prefix caching on,
    priority scheduling (long-form trees' requests first, then first passes: the priorities in
    ``services.clients``; with ``engine.extra.scheduling_policy: fcfs`` they queue as the
    others), the one-process executor for one device, and a Ray executor for tensor parallelism
    (its workers go in the replica's placement group)."""
    kwargs = dict(dtype=cfg.dtype, max_model_len=cfg.max_model_len, gpu_memory_utilization=cfg.gpu_memory_utilization,
                  tensor_parallel_size=cfg.tensor_parallel_size, enforce_eager=cfg.enforce_eager, seed=cfg.seed,
                  enable_prefix_caching=True, scheduling_policy="priority")
    kwargs["distributed_executor_backend"] = "ray" if cfg.tensor_parallel_size > 1 else "uni"
    return {**kwargs, **dict(cfg.extra)}


def sampling_params(ids: ReflectionIds, max_tokens: int, stop_ids: Sequence[int] = (), final_only: bool = False,
                    vocabulary_logprobs: int | None = None, detokenize: bool = True):
    """Greedy sampling that returns the reflection tokens' logprobs at each position and stops
    after any of ``stop_ids`` (the stop token is kept in the output's token ids).
    ``vocabulary_logprobs``: request that many top logprobs instead (the reference scripts' way);
    ``detokenize=False``: no text (the caller decodes the finished ids once, which is cheaper
    than vLLM's step-by-step detokenization)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    logprobs = dict(logprobs=vocabulary_logprobs) if vocabulary_logprobs else dict(logprob_token_ids=ids.all_ids)
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=list(stop_ids) or None,
                          skip_special_tokens=False, spaces_between_special_tokens=False, detokenize=detokenize,
                          output_kind=RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.CUMULATIVE,
                          **logprobs)


def to_continuation(completion, keep: frozenset[int] | None, decode=None) -> Continuation:
    """A vLLM completion as plain data: at each position the logprobs of the ``keep`` ids
    (None: every id returned); its text from ``decode(token ids)`` when given."""
    positions = [{tid: lp.logprob for tid, lp in step.items() if keep is None or tid in keep}
                 for step in completion.logprobs or []]
    token_ids = list(completion.token_ids)
    return Continuation(token_ids=token_ids, logprobs=positions, cumulative_logprob=float(completion.cumulative_logprob or 0.0),
                        text=decode(token_ids) if decode else completion.text)


class Engine:
    """A synchronous vLLM engine in this process, with the reflection-token ids looked up."""

    def __init__(self, cfg: EngineConfig, **overrides):
        """Start vLLM with ``cfg`` (``overrides``: further engine arguments); ``cfg.env`` is set
        in this process first."""
        for key, value in cfg.env.items():
            os.environ[key] = str(value)
        from vllm import LLM  # imported here: the env above must be set first

        from .tokenizer import reflection_ids

        self.cfg = cfg
        self.llm = LLM(model=cfg.model, **{**engine_kwargs(cfg), **overrides})
        self.tokenizer = self.llm.get_tokenizer()
        self.ids = reflection_ids(self.tokenizer)
        self._reflection_ids = frozenset(self.ids.all_ids)

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: Sequence[int] | int,
                 stop_ids: Sequence[int] = (), vocabulary_logprobs: int | None = None) -> list[Continuation]:
        """Greedy continuations of token-id ``prompts``, in order, with reflection-token logprobs
        (``vocabulary_logprobs``: the top that many of the whole vocabulary instead); each ends at
        end of sequence, at its token budget or after one of ``stop_ids``."""
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        budgets = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
        params = [sampling_params(self.ids, b, stop_ids, vocabulary_logprobs=vocabulary_logprobs) for b in budgets]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        keep = None if vocabulary_logprobs else self._reflection_ids
        return [to_continuation(out.outputs[0], keep) for out in outputs]

    def replay(self, requests: Sequence[dict]) -> list:
        """vLLM's outputs for recorded engine requests (``prompt``, ``max_tokens``, ``stop_ids``
        each; ``pipeline.services.recording``), all in one batched call, as the pipeline's
        replicas ran them (reflection-token logprobs, no detokenization)."""
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=r["prompt"]) for r in requests]
        params = [sampling_params(self.ids, r["max_tokens"], r["stop_ids"], detokenize=False) for r in requests]
        return self.llm.generate(prompts, params, use_tqdm=False)

    def shutdown(self) -> None:
        """Release the engine (its worker processes and memory)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
