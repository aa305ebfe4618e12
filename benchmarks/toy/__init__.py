"""Ground truth on toy models: absorption, recovery and feature hedging of Matryoshka SAEs.

``python -m benchmarks.toy.run`` trains every configured SAE on four toy set-ups, caches each
run's metrics as JSON (reruns skip finished runs), and writes ``results.csv``,
``results.md`` and PNG figures. See ``benchmarks/toy/config.py`` for the set-ups and variants.
"""
