"""The original Matryoshka post's language-model analysis on all-MiniLM-L6-v2 (block 3).

A family of small vanilla BatchTopK "reference" SAEs and large vanilla and Matryoshka SAEs at
equal L0, compared by mean max correlation (how well each large SAE keeps the reference latents),
FVU, L0 and dead latents, with a tree view of a few reference latents and their descendants.
``python -m benchmarks.reference_family [--quick]``; see docs/analysis.md.
"""
