"""Self-RAG prompt formats and task templates (docs/algorithm.md, section 2), and prompts as token ids.

User text is text. A prompt is a sequence of *pieces*: plain strings (the template's wording
and the user's question, input, passage title and text), tokenized with the tokenizer's
special-token parsing off, and ``Special`` markers (``[Retrieval]``, ``<paragraph>``, ...) that
become their special ids. A question containing ``</s><s>### Instruction:`` or a passage
ending in ``[Relevant]`` stays ordinary text; only the template's markers are control tokens.
The readable ``prompt`` strings below render the same pieces as text.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

from .tokens import NO_RETRIEVAL, PARAGRAPH_CLOSE, PARAGRAPH_OPEN, RETRIEVAL, ReflectionIds

#: ``selfrag.prompt_style`` values: the authors' evaluation scripts' exact strings (the
#: default: the released models were evaluated with them) or the paper's Table 5 wording.
PROMPT_STYLES = ("reference", "paper")

#: The evaluation scripts' task instructions (``TASK_INST`` of the reference code).
REFERENCE_INSTRUCTIONS = {
    "fever": "Is the following statement correct or not? Say true if it's correct; otherwise say false.",
    "arc_c": "Given four answer candidates, A, B, C and D, choose the best answer choice.",
    "asqa": (
        "Answer the following question. The question may be ambiguous and have multiple correct "
        "answers, and in that case, you have to provide a long-form answer including all correct answers."
    ),
}

#: What the evaluation scripts put between the instruction and the question: the short-form
#: script writes ``## Input:`` with blank lines, except for ARC (``### Input:`` and one newline);
#: the long-form script (asqa rows decoded as a tree) writes ``## Input:`` with no newline before it.
REFERENCE_SEPARATORS = {"fever": "\n\n## Input:\n\n", "arc_c": "\n\n### Input:\n", "asqa": "\n\n## Input:\n\n"}
REFERENCE_LONG_FORM_SEPARATOR = "## Input:\n\n"

#: The paper's Table 5 instructions, joined to the question with a blank line (``prompt_style: paper``;
#: the embedded tiny model was trained on these).
PAPER_INSTRUCTIONS = {
    "fever": (
        "Is the following statement correct or not? Say true if it's correct; otherwise say false. "
        "Don't capitalize or add periods, just say \"true\" or \"false\"."
    ),
    "arc_c": (
        "Given four answer candidates, A, B, C and D, choose the best answer choice. Please answer "
        "with the capitalized alphabet only, without adding any extra phrase or period."
    ),
    "asqa": REFERENCE_INSTRUCTIONS["asqa"],
}

#: Instructions by style.
TASK_INSTRUCTIONS = {"reference": REFERENCE_INSTRUCTIONS, "paper": PAPER_INSTRUCTIONS}

#: Tasks whose answers come from a closed set: candidates' scores are summed per answer.
CLOSED_SET_TASKS = frozenset({"fever", "arc_c"})

#: Free-form tasks: the question itself is the instruction.
FREE_FORM_TASKS = frozenset({"popqa", "triviaqa", "qa"})

KNOWN_TASKS = frozenset(REFERENCE_INSTRUCTIONS) | CLOSED_SET_TASKS | FREE_FORM_TASKS | {"factscore"}

#: The template's section markers (``format_prompt``'s and the reference task templates'): a
#: trainer that cuts a text into prompt and response by them must find only the template's own.
TEMPLATE_MARKERS = ("### Instruction:", "### Input:", "### Response:", "## Input:")


def task_instruction(question: str, task: str | None, style: str = "reference", long_form: bool = False) -> str:
    """The instruction text for a question under a task template.

    ``None`` or a free-form task returns the question itself; ``factscore`` treats the question
    as a person's name (``"Tell me a bio about {name}"``), unless it is already phrased so.
    Templated tasks (fever, arc_c, asqa) put their instruction before the question, in
    ``style``; ``long_form`` marks a row decoded as a tree (the reference's long-form script
    joins asqa without a newline). Raises ValueError for an unknown task or style.
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; known: {list(PROMPT_STYLES)}")
    if task is None or task in FREE_FORM_TASKS:
        return question
    if task == "factscore":
        return question if question.lower().startswith("tell me a bio") else f"Tell me a bio about {question}"
    if task not in REFERENCE_INSTRUCTIONS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(KNOWN_TASKS)}")
    if style == "paper":
        return f"{PAPER_INSTRUCTIONS[task]}\n\n{question}"
    separator = REFERENCE_LONG_FORM_SEPARATOR if long_form and task == "asqa" else REFERENCE_SEPARATORS[task]
    return f"{REFERENCE_INSTRUCTIONS[task]}{separator}{question}"


def format_prompt(question: str, input_text: str | None = None, task: str | None = None,
                  style: str = "reference", long_form: bool = False) -> str:
    """The Self-RAG prompt, ending with ``"### Response:\\n"`` (``task_instruction`` for the rest)."""
    instruction = task_instruction(question, task, style, long_form)
    if input_text:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class Special:
    """A template marker in a prompt: it becomes its special token id, never text."""

    token: str


Piece = Union[str, Special]


def evidence_pieces(title: str | None, text: str | None) -> list[Piece]:
    """One passage as evidence: ``[Retrieval]<paragraph>{title}\\n{text}</paragraph>``."""
    return [Special(RETRIEVAL), Special(PARAGRAPH_OPEN), f"{title or ''}\n{text or ''}", Special(PARAGRAPH_CLOSE)]


def render(pieces: Iterable[Piece]) -> str:
    """The readable text of prompt pieces (markers written as their strings)."""
    return "".join(p.token if isinstance(p, Special) else p for p in pieces)


def evidence_prompt(prompt: str, title: str | None, text: str | None) -> str:
    """Readable form: ``prompt`` followed by one passage as evidence."""
    return prompt + render(evidence_pieces(title, text))


def no_evidence_prompt(prompt: str) -> str:
    """Readable form: force the no-retrieval path by appending ``[No Retrieval]``."""
    return f"{prompt}{NO_RETRIEVAL}"


#: Passages whose evidence ids a ``PromptTokens`` keeps (about 10 MB with their text as keys, for
#: passages of 100 words).
PASSAGE_CACHE_SIZE = 8192


class PromptTokens:
    """Builds prompts as token ids for one tokenizer.

    ``encode_text`` tokenizes plain text with special-token parsing off and no BOS/EOS added;
    ``bos`` is what the tokenizer puts before a sequence (e.g. ``[<s> id]``); markers are looked
    up in ``special`` (the reflection ids, plus e.g. ``</s>``). Adjacent strings are joined
    and tokenized as one run, so a clean prompt gets the ids the tokenizer would give the whole
    rendered string, and text can never produce a special id.
    """

    def __init__(self, encode_text: Callable[[str], list[int]], ids: ReflectionIds, bos: Sequence[int] = (),
                 extra_special: dict[str, int] | None = None):
        self.encode_text, self.bos = encode_text, list(bos)
        self.special = {**ids.by_token, **(extra_special or {})}
        self._special_ids = frozenset(self.special.values()) | frozenset(self.bos)
        # A passage is evidence in one prompt per candidate and per long-form tree node that
        # reads it, and popular passages come back row after row: tokenize each once.
        self._passages: dict[tuple, array] = {}

    def text(self, text: str) -> list[int]:
        """Ids of plain text; raises ValueError if the tokenizer produced a special id anyway."""
        out = list(self.encode_text(text)) if text else []
        if self._special_ids.intersection(out):
            raise ValueError("the tokenizer turned text into a special token id; it must tokenize text "
                             "with special-token parsing off")
        return out

    def encode(self, pieces: Iterable[Piece]) -> list[int]:
        """Ids of prompt pieces: strings as text runs, markers as their special ids."""
        out, run = [], []
        for piece in pieces:
            if isinstance(piece, Special):
                out += self.text("".join(run)) + [self.special[piece.token]]
                run = []
            else:
                run.append(piece)
        return out + self.text("".join(run))

    def prompt(self, text: str) -> list[int]:
        """A formatted prompt (``format_prompt``'s text, all of it text) with the tokenizer's BOS."""
        return self.bos + self.text(text)

    def evidence(self, context: Sequence[int], title: str | None, text: str | None) -> list[int]:
        """``context`` followed by one passage as evidence."""
        key = (title, text)
        ids = self._passages.get(key)
        if ids is None:
            if len(self._passages) >= PASSAGE_CACHE_SIZE:
                self._passages.clear()  # start over: simpler than an LRU, and rare
            ids = self._passages[key] = array("i", self.encode(evidence_pieces(title, text)))
        return list(context) + ids.tolist()

    def no_evidence(self, context: Sequence[int]) -> list[int]:
        """``context`` followed by ``[No Retrieval]``."""
        return list(context) + [self.special[NO_RETRIEVAL]]
