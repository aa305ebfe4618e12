"""Hedging and absorption per parent of the synthetic model's hierarchy, for trained SAELens SAEs.

For each feature with children: its best latent (largest decoder cosine with the parent's
direction); that latent's mean cosine with the children's directions (hedging: > 0 when the
parent latent mixes in its children); and absorption, the share of held-out samples with the
parent and one of its children active on which that latent does not fire.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..harness import markdown_table, write_csv

__all__ = ["parents_and_children", "hedging_per_parent", "hedging_markdown", "write_hedging"]


def parents_and_children(hierarchy: Any) -> list[tuple[int, list[int]]]:
    """``(parent feature, [child features])`` for every node of the hierarchy with children."""
    out, stack = [], list(hierarchy.roots)
    while stack:
        node = stack.pop()
        kids = [c.feature_index for c in node.children if c.feature_index is not None]
        if node.feature_index is not None and kids:
            out.append((int(node.feature_index), [int(k) for k in kids]))
        stack.extend(node.children)
    return sorted(out)


@torch.no_grad()
def hedging_per_parent(sae: Any, feature_vectors: torch.Tensor, pairs: list[tuple[int, list[int]]],
                       hidden: torch.Tensor, features: torch.Tensor) -> dict[str, float]:
    """Mean over parents of the hedging cosine and of absorption (parents seen with a child at least 10 times)."""
    W = sae.W_dec.detach().float().cpu()
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    F = feature_vectors.float().cpu()
    Fn = F / F.norm(dim=1, keepdim=True).clamp_min(1e-12)
    parents = torch.tensor([p for p, _ in pairs])
    best = (Fn[parents] @ Wn.T).argmax(1)
    latents = torch.cat([sae.encode(hidden[i:i + 4096]).float().cpu()[:, best] for i in range(0, len(hidden), 4096)])
    feats = features.to_dense() if features.is_sparse else features
    hedges, absorptions = [], []
    for j, (p, kids) in enumerate(pairs):
        hedges.append(float((Wn[best[j]] @ Fn[kids].T).mean()))
        both = (feats[:, p] > 0) & (feats[:, kids] > 0).any(1)
        if int(both.sum()) >= 10:
            absorptions.append(float((latents[both, j] <= 0).float().mean()))
    return dict(parents=len(pairs), hedging=sum(hedges) / len(hedges),
                absorption=sum(absorptions) / max(len(absorptions), 1), absorption_parents=len(absorptions))


def write_hedging(saes_dir: Path, model: Any, hidden: torch.Tensor, features: torch.Tensor, out_csv: Path) -> list[dict]:
    """Score every SAELens folder ``saes_dir/<variant>-l0<L>-s<seed>/saelens``; one CSV row per SAE
    (rows already in ``out_csv`` for SAEs not found there are kept)."""
    from sae_lens import SAE

    pairs = parents_and_children(model.hierarchy)
    rows = []
    for folder in sorted(Path(saes_dir).glob("*/saelens")):
        sae = SAE.load_from_disk(str(folder), device="cpu")
        name = folder.parent.name
        variant, rest = name.rsplit("-l0", 1)
        l0, seed = rest.split("-s")
        scores = hedging_per_parent(sae, model.feature_dict.feature_vectors, pairs, hidden, features)
        rows.append(dict(sae=variant, l0=int(l0), seed=int(seed), **{k: round(v, 4) if isinstance(v, float) else v
                                                                       for k, v in scores.items()}))
    if rows:
        # rows of SAEs not in saes_dir (trained from another cache) stay, as in results.csv
        scored = {(r["sae"], r["l0"], r["seed"]) for r in rows}
        kept = []
        if out_csv.exists():
            with out_csv.open() as f:
                kept = [r for r in csv.DictReader(f) if (r["sae"], int(r["l0"]), int(r["seed"])) not in scored]
        write_csv(out_csv, kept + rows, list(rows[0]))
    return rows


def hedging_markdown(label: str, rows: list[dict]) -> str:
    """Mean over seeds of hedging and absorption per variant, as a Markdown section."""
    by: dict[tuple[str, Any], list[dict]] = defaultdict(list)
    for r in rows:
        by[(r["sae"], r["l0"])].append(r)
    ranked = sorted(by.items(), key=lambda kv: statistics.mean(r["absorption"] for r in kv[1]))
    table = markdown_table(["SAE", "L0", "seeds", "hedging", "absorption"], (
        [name, l0, ",".join(str(r["seed"]) for r in rs), f"{statistics.mean(r['hedging'] for r in rs):.4f}",
         f"{statistics.mean(r['absorption'] for r in rs):.4f}"] for (name, l0), rs in ranked))
    return (f"\n### Hedging and absorption per parent, {label}\n\n"
            "For each of the hierarchy's parents, its best latent (decoder cosine): mean cosine with the children's "
            "directions (hedging) and the share of samples with the parent and a child active where it does not fire "
            "(absorption); means over parents, then over seeds.\n\n" + table + "\n")
