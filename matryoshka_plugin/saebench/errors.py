"""The error every check of an SAEBench run raises."""

from __future__ import annotations


class SAEBenchError(ValueError):
    """Bad input for an SAEBench run, reported before any expensive work."""
