"""Every trainer and option scored on the fixed family of random feature hierarchies (issue 26).

* :mod:`.configs` — the configurations (trainer, prefix mode, options, learning rate) and how
  each becomes trainer keywords on one tree.
* :mod:`.study` — one run (tree x configuration x seed): train, measure, one JSON record; the
  resumable family run over a process pool.
* :mod:`.analysis` — per (parent, child) absorption and what the latents learned; distributions
  over trees, the summary table, the figure and the failure list.

Run with ``python -m benchmarks.hierarchy_family --help``; see docs/hierarchy_family.md.
"""
