"""Evaluation of annotated output (``python -m jobs.evaluate``; the run itself:
``pipeline.run.evaluate``).

- ``metrics``: pure functions over output rows (plain dicts): answer matching, per-task
  accuracy, retrieval rate, reflection-token probes.
- ``layouts``: readers of the official Self-RAG evaluation files, converted to query rows.
- ``synthetic``: the held-out evaluation suite of the synthetic world (plain rows and probes).
- ``sources``: the query shards an evaluation annotates (the synthetic suite, converted files).
- ``outputs``: annotated outputs read back, and the retrieval mode they were annotated with.
- ``tokens``: the reflection and end-of-sequence token ids of the model's tokenizer.
- ``tables``: the figures printed as tables.
"""


def log(message: str) -> None:
    """One progress line of the evaluation job (``[evaluate] message``)."""
    print(f"[evaluate] {message}", flush=True)
