"""Fake engine and retriever with the interfaces of ``pipeline.services.clients``, and a fake
tokenizer, so the stage logic runs in milliseconds without vLLM, FAISS or Ray.

Prompt text is tokenized one id per character (1000 + its code point); the 15 reflection
tokens have ids 100..114, end of sequence is 2; generated "words" are ids 10..99 that decode
to " w<id>".
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from pipeline.selfrag import tokens as T
from pipeline.selfrag.prompts import PromptTokens
from pipeline.selfrag.scoring import Continuation

IDS = T.ReflectionIds.from_lookup({tok: 100 + i for i, tok in enumerate(T.ALL_REFLECTION_TOKENS)}.get)
BOS, EOS = 1, 2
TOKENS = PromptTokens(lambda text: [1000 + ord(c) for c in text], IDS, bos=[BOS], extra_special={"</s>": EOS})
NAMES = {v: k for k, v in IDS.by_token.items()} | {EOS: "</s>", BOS: "<s>"}


def decode(token_ids: Sequence[int]) -> str:
    """Text of generated ids, reflection tokens kept."""
    out = []
    for t in token_ids:
        if t in NAMES:
            out.append(NAMES[t])
        elif t >= 1000:
            out.append(chr(t - 1000))
        else:
            out.append(f" w{t}")
    return "".join(out)


def text_of(prompt_ids: Sequence[int]) -> str:
    """The readable text of a prompt's ids (markers written as their strings)."""
    return decode(prompt_ids)


def position(token: int, probs: dict[int, float] | None = None) -> tuple[int, dict[int, float]]:
    """A generated position: the sampled token and the reflection tokens' probabilities there."""
    return token, {t: math.log(p) for t, p in (probs or {}).items() if p > 0}


def continuation(*positions, cumulative: float = -1.0) -> Continuation:
    """A continuation from token ids or ``position(...)`` pairs; its text is ``decode``'s."""
    ids, logprobs = [], []
    for pos in positions:
        tid, lp = (pos, {}) if isinstance(pos, int) else pos
        ids.append(tid)
        logprobs.append(lp)
    return Continuation(token_ids=ids, logprobs=logprobs, cumulative_logprob=cumulative, text=decode(ids))


Script = Callable[[str, int], "Continuation | str"]


class FakeEngine:
    """``EngineClient``: ``script(prompt text, max_tokens)`` gives each continuation (or an error
    string); every call is recorded as (route, [prompt text], [budgets], stop_ids), its priority
    in ``priorities``."""

    def __init__(self, script: Script):
        self.script, self.calls, self.priorities = script, [], []

    async def generate(self, prompts, max_tokens, route, stop_ids=(), priority=0):
        assert prompts, "a call without requests"
        texts = [text_of(p) for p in prompts]
        self.calls.append((route, texts, list(max_tokens), list(stop_ids)))
        self.priorities.append(priority)
        return [self.script(t, m) for t, m in zip(texts, max_tokens)]


class FakeRetriever:
    """``RetrieverClient``: ``passages(query)`` gives the hits; calls are recorded."""

    def __init__(self, passages: Callable[[str], list[dict]]):
        self.passages, self.calls = passages, []

    async def search(self, queries, k):
        self.calls.append(list(queries))
        return [[dict(p, retrieval_score=1.0 - j / 10) for j, p in enumerate(self.passages(q)[:k])] for q in queries]
