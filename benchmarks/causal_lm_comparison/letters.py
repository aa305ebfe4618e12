"""Where the first-letter directions sit in each SAE's decoder.

SAEBench's absorption eval trains one linear probe per first letter on the model's activations
(the ground truth) and scores how the SAE's latents carry it. This reads those probes from the
run's absorption artifacts and, for every trained SAE, finds per letter the decoder row closest to
the probe's direction (largest absolute cosine) and where that latent sits: in the first nested
group (the paper's first 1/32 of the latents) or later. For a flat SAE the same index range is
reported, where a letter's best row falls by chance with probability 1/32.

    python -m benchmarks.causal_lm_comparison.letters --config smollm2_135m --run-dir RUN_DIR
"""

from __future__ import annotations

import argparse
import pickle
import statistics
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

__all__ = ["LetterAlignment", "letter_alignment", "find_probe", "alignment_rows", "main"]


class LetterAlignment(NamedTuple):
    """Per letter, the decoder row closest to its probe direction."""

    latent: torch.Tensor
    """``[n_letters]`` index of the decoder row with the largest absolute cosine."""
    cos: torch.Tensor
    """``[n_letters]`` that absolute cosine."""
    in_first_group: torch.Tensor
    """``[n_letters]`` bool: the latent is among the first ``first_width`` latents."""


def letter_alignment(probe: torch.Tensor, decoder: torch.Tensor, first_width: int) -> LetterAlignment:
    """``probe [n_letters, d]`` (one direction per letter), ``decoder [n_latents, d]`` (any norms;
    zero rows never match)."""
    p = torch.nn.functional.normalize(probe.detach().float(), dim=1)
    dec = torch.nn.functional.normalize(decoder.detach().float(), dim=1)
    cos, latent = (p @ dec.T).abs().max(dim=1)
    return LetterAlignment(latent, cos, latent < first_width)


def find_probe(eval_dir: Path, tl_model_name: str, layer: int) -> torch.Tensor:
    """The first-letter probe weights ``[26, d]`` SAEBench's absorption eval trained in this run
    (``<eval_dir>/artifacts/absorption/<settings>/probes/<model>/layer_<layer>/probe.pth``); raises
    ``FileNotFoundError`` if absorption has not run, ``ValueError`` if several settings left probes."""
    found = sorted((eval_dir / "artifacts" / "absorption").glob(f"*/probes/{tl_model_name}/layer_{layer}/probe.pth"))
    if not found:
        raise FileNotFoundError(f"no first-letter probe under {eval_dir}/artifacts/absorption: run the absorption eval first")
    if len(found) > 1:
        raise ValueError(f"probes of several absorption settings: {[str(p) for p in found]}")
    from sae_bench.evals.absorption.probing import LinearProbe

    # SAEBench pickles the whole probe module; only its classes may be rebuilt (no arbitrary code).
    try:
        with torch.serialization.safe_globals([LinearProbe, torch.nn.Linear]):
            probe = torch.load(found[0], map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{found[0]} is not a first-letter probe SAEBench wrote: {str(e).splitlines()[0]}") from None
    weights = [v for v in probe.state_dict().values() if v.ndim == 2] if isinstance(probe, torch.nn.Module) else []
    if len(weights) != 1:
        raise ValueError(f"{found[0]}: expected one weight matrix, found {len(weights)}")
    return weights[0]


def alignment_rows(plan: Any, specs: Sequence[Any], first_fraction: float) -> list[dict[str, Any]]:
    """One row per trained SAE of ``specs``: mean and median best |cos| over letters, the letters
    whose best row has |cos| > 0.5, and how many of those best rows sit in the first
    ``first_fraction`` of the latents."""
    from matryoshka_plugin import load_dictionary
    from matryoshka_plugin.registry import decoder_rows

    cfg = plan.cfg
    probe = find_probe(plan.eval_dir, cfg.tl_model_name, cfg.model.layer)
    rows = []
    for s in specs:
        if s.source != "train" or not (Path(s.location) / "ae.pt").is_file():
            continue
        ae, _ = load_dictionary(s.location)
        dec = decoder_rows(ae)
        first = max(1, round(first_fraction * dec.shape[0]))
        a = letter_alignment(probe, dec, first)
        cos = a.cos.tolist()
        rows.append({"sae": s.name, "architecture": s.architecture, "target_l0": s.k, "seed": s.seed,
                     "mean_cos": statistics.fmean(cos), "median_cos": statistics.median(cos),
                     "letters_above_0.5": sum(c > 0.5 for c in cos), "letters": len(cos),
                     "best_in_first_group": int(a.in_first_group.sum()), "first_width": first})
    return rows


def main(argv: list[str] | None = None) -> int:
    from ..harness import markdown_table
    from .config import load_config
    from .plan import build_plan

    p = argparse.ArgumentParser(prog="python -m benchmarks.causal_lm_comparison.letters", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="smollm2_135m")
    p.add_argument("--run-dir")
    p.add_argument("--first-fraction", type=float, default=1 / 32,
                   help="the first nested group's share of the latents (default: the paper's 1/32)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, {"run_dir": args.run_dir} if args.run_dir else None)
    plan = build_plan(cfg)
    rows = alignment_rows(plan, [s for s in plan.saes if s.stage != "sweep"], args.first_fraction)
    print(markdown_table(
        ["SAE", "mean best abs. cosine", "median", "letters > 0.5", "best row in the first group"],
        [[r["sae"], f"{r['mean_cos']:.3f}", f"{r['median_cos']:.3f}", f"{r['letters_above_0.5']} / {r['letters']}",
          f"{r['best_in_first_group']} / {r['letters']} (first {r['first_width']})"] for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
