"""Reproducible benchmarks of matryoshka_plugin (not part of the installed package)."""
