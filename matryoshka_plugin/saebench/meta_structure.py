"""SAEBench's meta-structure eval on any decoder: a BatchTopK meta-SAE trained on the decoder rows,
scored by the variance of the rows it explains (Bussmann et al. 2025, appendix D.1).

``run_saebench(..., evals=["meta_structure"])`` needs SAEs recorded for a TransformerLens model;
:func:`decoder_meta_structure` takes the decoder of any SAE module (or the rows themselves), so
the toy and MiniLM benchmarks can report it. It hands the rows to SAEBench's own
``run_eval_single_sae`` inside a stock SAELens SAE.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import SAEBenchError
from ..registry import decoder_rows
from .results import mean_std


def _rows(decoder: torch.Tensor | torch.nn.Module) -> torch.Tensor:
    if isinstance(decoder, torch.nn.Module):
        decoder = decoder_rows(decoder)
    if not isinstance(decoder, torch.Tensor) or decoder.ndim != 2:
        raise SAEBenchError(f"expected decoder rows [n_latents, d] or an SAE module, got {type(decoder).__name__}")
    # SAEBench's SAEs have unit decoder rows (it checks them); folding the norms leaves the
    # directions, which is what the meta-SAE is about.
    return torch.nn.functional.normalize(decoder.detach().float().cpu(), dim=1)


def decoder_meta_structure(
    decoder: torch.Tensor | torch.nn.Module,
    seeds: Sequence[int] = (42,),
    device: str = "cpu",
    **config: Any,
) -> dict[str, Any]:
    """SAEBench's meta-structure eval of one decoder, once per seed.

    Args:
        decoder: decoder rows ``[n_latents, d]`` or a registered SAE module (this package's,
            dictionary_learning's); rows are scaled to unit norm first.
        seeds: one meta-SAE per seed (torch, Python and the config's ``random_seed``).
        device: where the meta-SAE trains.
        config: ``MetaStructureEvalConfig`` fields (``train_steps``, ``width_ratio``, ``k``, ...;
            default SAEBench's).

    Returns ``{"variance_explained", "variance_explained_std", "n", "per_seed": [...],
    "mse_per_seed": [...], "seconds"}`` (the standard deviation is None for one seed).
    """
    import dataclasses
    import random
    import time

    from sae_bench.evals.meta_structure.eval_config import MetaStructureEvalConfig
    from sae_bench.evals.meta_structure.main import run_eval_single_sae
    from sae_lens import StandardSAE, StandardSAEConfig

    names = {f.name for f in dataclasses.fields(MetaStructureEvalConfig)}
    unknown = sorted(set(config) - names)
    if unknown or "random_seed" in config:
        raise SAEBenchError(f"unknown meta_structure config fields {unknown or ['random_seed']} (seeds come from "
                            f"seeds=); allowed: {sorted(names - {'random_seed'})}")
    rows = _rows(decoder)
    sae = StandardSAE(StandardSAEConfig(d_in=rows.shape[1], d_sae=rows.shape[0]))
    with torch.no_grad():
        sae.W_dec.copy_(rows)
    values, mses = [], []
    t0 = time.time()
    for seed in seeds:
        random.seed(seed)
        torch.manual_seed(seed)
        cfg = MetaStructureEvalConfig(random_seed=int(seed), **config)
        out = run_eval_single_sae("decoder", "custom_sae", sae, cfg, device)
        m = out.eval_result_metrics.meta_structure
        values.append(float(m.decoder_fraction_variance_explained))
        mses.append(float(m.final_reconstruction_mse))
    mean, std, n = mean_std(values)
    return {"variance_explained": mean, "variance_explained_std": std, "n": n, "per_seed": values,
            "mse_per_seed": mses, "seconds": time.time() - t0}
