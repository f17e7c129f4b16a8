"""A thin vLLM wrapper that returns plain records (``selfrag.scoring.Continuation``).

Every generation is greedy and asks vLLM for the logprobs of exactly the 15 reflection tokens
at every generated position (``SamplingParams(logprob_token_ids=...)``): exact, and far
cheaper than whole-vocabulary logprobs.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

from .config import EngineConfig
from .selfrag.scoring import Continuation
from .selfrag.tokens import ReflectionIds

log = logging.getLogger(__name__)


class PromptTooLong(ValueError):
    """A prompt that leaves no room for its new-token budget in the model's context."""


class Engine:
    """One vLLM engine replica with the Self-RAG reflection-token ids looked up."""

    def __init__(self, cfg: EngineConfig):
        for key, value in cfg.env.items():
            os.environ.setdefault(key, str(value))
        from vllm import LLM  # imported here: the env above must be set first

        self.cfg = cfg
        self.llm = LLM(
            model=cfg.model,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            tensor_parallel_size=cfg.tensor_parallel_size,
            enforce_eager=cfg.enforce_eager,
            seed=cfg.seed,
            **dict(cfg.extra),
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.ids = ReflectionIds.from_lookup(self.tokenizer.convert_tokens_to_ids, self.tokenizer.unk_token_id)
        self._reflection_ids = frozenset(self.ids.all_ids)

    def prompt_length(self, prompt: str) -> int:
        """Number of tokens the engine will see for a prompt (special tokens included)."""
        return len(self.tokenizer(prompt).input_ids)

    def check_fits(self, prompt: str, max_tokens: int) -> None:
        """Raise PromptTooLong unless prompt tokens + max_tokens fit in max_model_len."""
        n = self.prompt_length(prompt)
        if n + max_tokens > self.cfg.max_model_len:
            raise PromptTooLong(
                f"prompt is {n} tokens; with {max_tokens} new tokens it exceeds "
                f"max_model_len={self.cfg.max_model_len}"
            )

    def sampling_params(self, max_tokens: int):
        """Greedy sampling that returns the reflection tokens' logprobs at each position."""
        from vllm import SamplingParams

        return SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            logprob_token_ids=self.ids.all_ids,
            skip_special_tokens=False,
            spaces_between_special_tokens=False,
        )

    def generate(self, prompts: Sequence[str], max_tokens: Sequence[int] | int) -> list[Continuation]:
        """Greedy continuations of ``prompts``, in order, with reflection-token logprobs."""
        if not prompts:
            return []
        budgets = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
        params = [self.sampling_params(b) for b in budgets]
        outputs = self.llm.generate(list(prompts), params, use_tqdm=False)
        return [self._to_continuation(out.outputs[0]) for out in outputs]

    def _to_continuation(self, completion) -> Continuation:
        positions = []
        for step in completion.logprobs or []:
            positions.append({tid: lp.logprob for tid, lp in step.items() if tid in self._reflection_ids})
        return Continuation(
            token_ids=list(completion.token_ids),
            logprobs=positions,
            cumulative_logprob=float(completion.cumulative_logprob or 0.0),
            text=completion.text,
        )

    def shutdown(self) -> None:
        """Release the engine (its worker processes and memory)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
