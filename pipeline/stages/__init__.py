"""Thin Ray Data adapters, one file per stage: prepare, first pass, retrieve, critique, write.

Each stage takes and returns a ``pyarrow.Table`` batch; rows a stage has nothing to do for
pass through untouched.
"""
