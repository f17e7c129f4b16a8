"""The benchmarks' code (``make bench*``; the entrypoints are ``jobs/bench*.py``).

- ``common``: what the benchmarks share: their working directory, the annotation job run on a
  workload, fresh timed processes, the figures printed.
- ``workload``: the throughput benchmark's mix of questions of the synthetic world.
- ``cpu_account``: where the machine's CPU goes, by role.
- ``reference_baseline``: a per-query Self-RAG baseline, independent of ``pipeline.selfrag``.
- ``throughput`` (``make bench``), ``scale`` (``make bench-scale``), ``writer``
  (``make bench-writer``), ``index`` (``make bench-index``), ``encoder`` (``make bench-encoder``),
  ``corpus`` (``make bench-corpus``): each benchmark.

Nothing is imported here: ``encoder`` runs where only torch and transformers are installed.
"""
