"""Self-RAG reflection tokens: their exact strings, their groups, and id lookup.

Token ids are always looked up from the tokenizer (``ReflectionIds.from_lookup``), never
hard-coded: the released 7B/13B models and the embedded tiny model number them differently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

NO_RETRIEVAL = "[No Retrieval]"
RETRIEVAL = "[Retrieval]"
CONTINUE_EVIDENCE = "[Continue to Use Evidence]"
IRRELEVANT = "[Irrelevant]"
RELEVANT = "[Relevant]"
FULLY_SUPPORTED = "[Fully supported]"
PARTIALLY_SUPPORTED = "[Partially supported]"
NO_SUPPORT = "[No support / Contradictory]"
UTILITY = tuple(f"[Utility:{k}]" for k in range(1, 6))
PARAGRAPH_OPEN = "<paragraph>"
PARAGRAPH_CLOSE = "</paragraph>"

RETRIEVE_GROUP = (NO_RETRIEVAL, RETRIEVAL, CONTINUE_EVIDENCE)
ISREL_GROUP = (IRRELEVANT, RELEVANT)
ISSUP_GROUP = (FULLY_SUPPORTED, PARTIALLY_SUPPORTED, NO_SUPPORT)
ISUSE_GROUP = UTILITY
MARKUP = (PARAGRAPH_OPEN, PARAGRAPH_CLOSE)

#: All 15 reflection tokens, in a fixed order.
ALL_REFLECTION_TOKENS = RETRIEVE_GROUP + ISREL_GROUP + ISSUP_GROUP + ISUSE_GROUP + MARKUP

#: The tokenizer's own special tokens, the same in the Llama-2 vocabulary the released models
#: extend and in the embedded tiny model: beginning and end of sequence, unknown, padding.
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>")

_STRIP_RE = re.compile(
    "|".join(re.escape(t) for t in sorted(ALL_REFLECTION_TOKENS + ("</s>", "<s>"), key=len, reverse=True))
)


class MissingReflectionTokens(ValueError):
    """A tokenizer that does not know every reflection token (not a Self-RAG model)."""


@dataclass(frozen=True)
class ReflectionIds:
    """Token ids of the reflection tokens for one tokenizer."""

    by_token: dict[str, int]

    @classmethod
    def from_lookup(cls, lookup: Callable[[str], int | None], unk_id: int | None = None) -> "ReflectionIds":
        """Build from a token->id function (e.g. ``tokenizer.convert_tokens_to_ids``).

        Raises MissingReflectionTokens naming the missing tokens if the tokenizer does not know all 15
        (a tokenizer maps unknown strings to its unk id, which counts as missing).
        """
        by_token, missing = {}, []
        for tok in ALL_REFLECTION_TOKENS:
            tid = lookup(tok)
            if tid is None or (unk_id is not None and tid == unk_id):
                missing.append(tok)
            else:
                by_token[tok] = int(tid)
        if missing:
            raise MissingReflectionTokens(f"tokenizer lacks Self-RAG reflection tokens: {missing}")
        return cls(by_token)

    def __getitem__(self, token: str) -> int:
        return self.by_token[token]

    def ids(self, group: tuple[str, ...]) -> list[int]:
        """Ids of a group of tokens, in the group's order."""
        return [self.by_token[t] for t in group]

    @property
    def all_ids(self) -> list[int]:
        """The ids of all 15 reflection tokens (what the engine must return logprobs for)."""
        return self.ids(ALL_REFLECTION_TOKENS)


def strip_reflection_tokens(text: str) -> str:
    """Remove reflection tokens, paragraph markup and ``<s>``/``</s>`` from text."""
    return _STRIP_RE.sub("", text)
