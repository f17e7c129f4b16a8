"""Evaluation of annotated output (``python -m jobs.evaluate``).

- ``metrics``: pure functions over output rows (plain dicts): answer matching, per-task
  accuracy, retrieval rate, reflection-token probes.
- ``layouts``: readers of the official Self-RAG evaluation files, converted to query rows.
- ``synthetic``: the held-out evaluation suite of the synthetic world (plain rows and probes).
"""
