"""The Self-RAG model's tokenizer, loaded without its weights, and prompts as token ids.

Stages tokenize on CPU and send token ids to the engine (``TokensPrompt``), so vLLM never
parses special tokens out of user text.
"""

from __future__ import annotations

from functools import lru_cache

from . import io
from .selfrag.prompts import PromptTokens
from .selfrag.tokens import ReflectionIds

#: Files a Hugging Face tokenizer may need; a remote model directory is copied with only these.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "config.json", "generation_config.json")


@lru_cache(maxsize=4)
def load_tokenizer(model: str):
    """The model's Hugging Face tokenizer (a remote model: its tokenizer files only, cached per node)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(io.localize(model, only=TOKENIZER_FILES))


def reflection_ids(tokenizer) -> ReflectionIds:
    """The reflection-token ids of a tokenizer (ValueError naming any it lacks)."""
    return ReflectionIds.from_lookup(tokenizer.convert_tokens_to_ids, tokenizer.unk_token_id)


def bos_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a sequence (``[<s>]`` for Llama; ``[]`` for none)."""
    plain = tokenizer("x", add_special_tokens=False).input_ids
    full = tokenizer("x").input_ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def prompt_tokens(tokenizer) -> PromptTokens:
    """Token-id prompt builder for a Hugging Face tokenizer: text with special-token parsing off."""
    def encode_text(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids

    extra = {tokenizer.eos_token: tokenizer.eos_token_id} if tokenizer.eos_token is not None else {}
    return PromptTokens(encode_text, reflection_ids(tokenizer), bos_ids(tokenizer), extra)


@lru_cache(maxsize=4)
def model_prompt_tokens(model: str) -> tuple[PromptTokens, object]:
    """(prompt builder, tokenizer) of a model, loaded once per process."""
    tok = load_tokenizer(model)
    return prompt_tokens(tok), tok
