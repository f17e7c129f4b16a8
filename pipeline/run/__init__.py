"""What each job does, as library functions; ``jobs/`` only parses a command line, calls one of
these and maps the outcome to an exit code (``exit_codes``).

- ``annotate``: the annotation run (preflight, lease, execute, manifest, report);
  ``execute`` runs the Ray Data pipeline over the shards still to do, ``output`` prepares the
  output location, ``stage_metrics`` collects the per-stage figures, ``summary`` prints the
  end-of-run lines.
- ``evaluate``: the evaluation run (annotation runs per mode, then the figures).
- ``index_build``: the index build (an embedding pool, or precomputed vectors).
- ``export_dataset``: the export of a run as training data.
- ``errors``, ``signals``, ``exit_codes``: how a run stops early, and the exit code and the
  one line each way of stopping gives.
"""
