"""Helpers for scripts/bench.py (the edgebundle benchmark). Not part of the package."""
