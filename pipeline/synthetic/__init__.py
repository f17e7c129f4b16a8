"""Synthetic, deterministic data used by the embedded demo and its tiny model."""
