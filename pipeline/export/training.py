"""Generator records as training examples of the repository's tiny-model training code
(``pipeline.synthetic.training_data.Example``): the loss covers the reflection tokens and the
answer, never the prompt or a paragraph (``<paragraph>...</paragraph>``, markers included), as
in the paper and the synthetic training data."""

from __future__ import annotations

import re

from ..selfrag.prompts import Special, render
from ..selfrag.tokens import ALL_REFLECTION_TOKENS, PARAGRAPH_CLOSE, PARAGRAPH_OPEN
from ..synthetic.training_data import EOS, Example
from .records import prompt_of

_SPLIT_RE = re.compile("(" + "|".join(re.escape(t) for t in sorted(ALL_REFLECTION_TOKENS, key=len, reverse=True))
                       + ")")


def output_pieces(output: str) -> list:
    """A generator output as pieces: reflection tokens as ``Special`` markers, the rest text."""
    return [Special(p) if p in ALL_REFLECTION_TOKENS else p for p in _SPLIT_RE.split(output) if p]


def generator_example(record: dict) -> Example:
    """``prompt + output + </s>`` with loss spans over the output and ``</s>``, paragraphs left out."""
    prompt = prompt_of(record)
    pieces = [prompt, *output_pieces(record["output"]), Special(EOS)]
    spans, start, pos, inside = [], len(prompt), len(prompt), False
    for piece in pieces[1:]:
        text = piece.token if isinstance(piece, Special) else piece
        if isinstance(piece, Special) and piece.token == PARAGRAPH_OPEN:
            if pos > start:
                spans.append((start, pos))
            inside = True
        pos += len(text)
        if isinstance(piece, Special) and piece.token == PARAGRAPH_CLOSE and inside:
            start, inside = pos, False
    if pos > start and not inside:
        spans.append((start, pos))
    assert pos == len(render(pieces))
    return Example(pieces, spans, record.get("dataset_name") or "export", record["output"])
