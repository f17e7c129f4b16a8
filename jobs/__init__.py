"""Job entrypoints (``python -m jobs.<name>``), also used under ``ray job submit``."""
