"""Self-RAG prompt formats and task templates (SELF_RAG.md section 2)."""

from __future__ import annotations

from .tokens import NO_RETRIEVAL, PARAGRAPH_CLOSE, PARAGRAPH_OPEN, RETRIEVAL

#: Task instructions of the paper's Table 5; the question follows the instruction.
TASK_INSTRUCTIONS = {
    "fever": (
        "Is the following statement correct or not? Say true if it's correct; otherwise say false. "
        "Don't capitalize or add periods, just say \"true\" or \"false\"."
    ),
    "arc_c": (
        "Given four answer candidates, A, B, C and D, choose the best answer choice. Please answer "
        "with the capitalized alphabet only, without adding any extra phrase or period."
    ),
    "asqa": (
        "Answer the following question. The question may be ambiguous and have multiple correct "
        "answers, and in that case, you have to provide a long-form answer including all correct answers."
    ),
}

#: Tasks whose answers come from a closed set: candidates' scores are summed per answer.
CLOSED_SET_TASKS = frozenset({"fever", "arc_c"})

#: Free-form tasks: the question itself is the instruction.
FREE_FORM_TASKS = frozenset({"popqa", "triviaqa", "qa"})

KNOWN_TASKS = frozenset(TASK_INSTRUCTIONS) | CLOSED_SET_TASKS | FREE_FORM_TASKS | {"factscore"}


def task_instruction(question: str, task: str | None) -> str:
    """The instruction text for a question under a task template.

    ``None`` or a free-form task returns the question itself; ``factscore`` treats the question
    as a person's name (``"Tell me a bio about {name}"``), unless it is already phrased so.
    Raises ValueError for an unknown task.
    """
    if task is None or task in FREE_FORM_TASKS:
        return question
    if task == "factscore":
        return question if question.lower().startswith("tell me a bio") else f"Tell me a bio about {question}"
    if task in TASK_INSTRUCTIONS:
        return f"{TASK_INSTRUCTIONS[task]}\n\n{question}"
    raise ValueError(f"unknown task {task!r}; known tasks: {sorted(KNOWN_TASKS)}")


def format_prompt(question: str, input_text: str | None = None, task: str | None = None) -> str:
    """The Self-RAG prompt, ending with ``"### Response:\\n"``."""
    instruction = task_instruction(question, task)
    if input_text:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def evidence_prompt(prompt: str, title: str | None, text: str | None) -> str:
    """Append one passage as evidence: ``[Retrieval]<paragraph>{title}\\n{text}</paragraph>``."""
    return f"{prompt}{RETRIEVAL}{PARAGRAPH_OPEN}{title or ''}\n{text or ''}{PARAGRAPH_CLOSE}"


def no_evidence_prompt(prompt: str) -> str:
    """Force the no-retrieval path: append ``[No Retrieval]``."""
    return f"{prompt}{NO_RETRIEVAL}"
