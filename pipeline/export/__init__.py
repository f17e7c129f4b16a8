"""Offline dataset generation: an annotated run exported as training data (generator, critic and
chat SFT examples), with quality filters, a deterministic split and a dataset card.

Everything here is pure Python on rows and pyarrow tables; ``pipeline/run/export_dataset.py`` runs it
over the run's shards with Ray Data.
"""
