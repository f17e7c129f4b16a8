"""The Self-RAG model's tokenizer, loaded without its weights, and prompts as token ids.

Stages tokenize on CPU and send token ids to the engine (``TokensPrompt``), so vLLM never parses
special tokens out of user text. The driver loads the Hugging Face tokenizer once and turns it
into a ``TokenizerSpec``: the fast tokenizer's backend exactly as ``transformers`` configured it
(the ``tokenizers`` JSON), its BOS, and the ids of the reflection tokens and ``</s>``. Workers
rebuild it with the ``tokenizers`` library alone (milliseconds, where importing and loading a
``transformers`` tokenizer costs seconds of CPU in every worker) and tokenize text with
``encode_special_tokens`` on: special-token parsing off, as ``split_special_tokens=True`` does.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

from ..infra.io import Storage, is_remote
from ..selfrag.prompts import PromptTokens
from ..selfrag.tokens import ReflectionIds

#: Files a Hugging Face tokenizer may need; a remote model directory is copied with only these.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "config.json", "generation_config.json")


@lru_cache(maxsize=4)
def load_tokenizer(storage: Storage, model: str):
    """The model's Hugging Face tokenizer (a remote model: its tokenizer files only, copied once
    per node by ``storage``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(storage.localize(model, only=TOKENIZER_FILES))


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


@dataclass(frozen=True)
class TokenizerSpec:
    """What workers need of the model's tokenizer, small enough to pass to every actor."""

    #: The model (path or id), for tokenizers without a fast backend.
    model: str
    #: The fast tokenizer's backend as ``tokenizers`` JSON (None: a slow-only tokenizer).
    backend: str | None
    bos: tuple[int, ...]
    #: (token, id) of the reflection tokens and of the end-of-sequence token.
    special: tuple[tuple[str, int], ...]

    @property
    def ids(self) -> ReflectionIds:
        """The reflection tokens' ids."""
        return ReflectionIds.from_lookup(dict(self.special).get)


def tokenizer_spec(storage: Storage, model: str) -> TokenizerSpec:
    """The spec of a model's tokenizer. Built from the Hugging Face tokenizer (importing
    ``transformers`` and loading it cost seconds), then kept in ``storage.cache_dir`` under a
    digest of the tokenizer's files and the ``transformers`` version: a later driver on this
    machine reads it back in milliseconds. MissingReflectionTokens when the tokenizer lacks one."""
    cached = _spec_cache_file(storage, model)
    if cached is not None and cached.exists():
        data = json.loads(cached.read_text())
        return TokenizerSpec(model=model, backend=data["backend"], bos=tuple(data["bos"]),
                             special=tuple((token, i) for token, i in data["special"]))
    tok = load_tokenizer(storage, model)
    backend = getattr(tok, "_tokenizer", None)
    special = dict(reflection_ids(tok).by_token)
    if tok.eos_token is not None:
        special[tok.eos_token] = tok.eos_token_id
    spec = TokenizerSpec(model=model, backend=backend.to_str() if backend is not None else None,
                         bos=tuple(bos_ids(tok)), special=tuple(special.items()))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"backend": spec.backend, "bos": spec.bos, "special": spec.special}))
        os.replace(tmp, cached)
    return spec


def _spec_cache_file(storage: Storage, model: str) -> Path | None:
    """Where the spec of ``model``'s tokenizer is cached; None for a hub id (no files to digest)."""
    if not is_remote(model) and not os.path.isdir(model):
        return None
    local = Path(storage.localize(model, only=TOKENIZER_FILES))
    digest = hashlib.sha256(f"transformers {metadata.version('transformers')}\n".encode())
    for name in TOKENIZER_FILES:
        if (local / name).is_file():
            digest.update(f"{name}\n".encode() + (local / name).read_bytes())
    return Path(storage.cache_dir) / "tokenizer-specs" / f"{digest.hexdigest()[:24]}.json"


@lru_cache(maxsize=4)
def spec_tokens(storage: Storage,
                spec: TokenizerSpec) -> tuple[PromptTokens, ReflectionIds, Callable[[Sequence[int]], str]]:
    """(prompt builder, reflection ids, decode with special tokens kept) from a spec, built once
    per process; with the ``tokenizers`` library only, unless the tokenizer has no fast backend
    (then the model's Hugging Face tokenizer, read with ``storage``)."""
    ids = spec.ids
    if spec.backend is None:
        tok = load_tokenizer(storage, spec.model)
        return prompt_tokens(tok), ids, lambda token_ids: tok.decode(token_ids, skip_special_tokens=False)
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(spec.backend)
    backend.encode_special_tokens = True  # special-token strings in text are text

    def encode_text(text: str) -> list[int]:
        return backend.encode(text, add_special_tokens=False).ids

    eos = {k: v for k, v in spec.special if k not in ids.by_token}
    tokens = PromptTokens(encode_text, ids, spec.bos, eos)
    return tokens, ids, lambda token_ids: backend.decode(list(token_ids), skip_special_tokens=False)


def model_prompt_tokens(storage: Storage, model: str) -> PromptTokens:
    """The prompt builder of a model (loads its Hugging Face tokenizer; for tests and benchmarks)."""
    return spec_tokens(storage, tokenizer_spec(storage, model))[0]
