"""The errors a run raises to stop early (their exit codes: ``pipeline.run.exit_codes``)."""

from __future__ import annotations


class IncompleteRun(RuntimeError):
    """Some shards were not written (their rows did not all come back)."""


class EvalError(ValueError):
    """A bad option or input of an evaluation: refused before any work, exit code 2."""
