"""Two attempts to fix the latent order that decides absorption under a prefix loss
(docs/hierarchy_family.md, "A default that holds", item 6). Neither cures the family; kept so
the figures there can be rerun.

* ``grow``: latents join the SAE one at a time (only the first ``m(step)`` may fire, ``m`` rising
  from 1 to ``n`` by ``grow_until`` of the run), so each new latent should take the largest
  direction the earlier ones leave.
* ``swap``: every ``every`` steps until 80% of the run, latent pairs with decoder cosine above
  ``cos_min`` that never co-fire are swapped when the later one's direction is present on more
  samples (projection at least 0.8 of its mean activation), and the moved latent's encoder row is
  tied to its decoder row (Adam's moments for it zeroed).

    python -m benchmarks.hierarchy_family.order_prototypes grow            # all 24 trees, seed 0
    python -m benchmarks.hierarchy_family.order_prototypes swap h00 h03 h09 h12
    python -m benchmarks.hierarchy_family.order_prototypes inspect         # hedging on a small tree
    python -m benchmarks.hierarchy_family.order_prototypes oracle --config btk_every

``oracle`` is not a fix but a measurement: the SAE starts at the true dictionary (the first
latents' decoder rows and tied encoder columns are the true feature directions, parents before
children, biases zero) and trains as the study does, so whether it stays there says whether the
configuration's loss keeps the true features or moves away from them.

``inspect`` trains ``btk_every`` and ``btk_none`` on :data:`SMALL_TREE` (2 parents with 3
independent children each, 3 singletons) and prints each latent's decoder cosine with every
true feature.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from matryoshka_plugin import MatryoshkaBatchTopKTrainer

from .configs import config_by_name, trainer_kwargs
from .study import StudySettings, family, measure_run


class GrowingTrainer(MatryoshkaBatchTopKTrainer):
    """Only latents ``[0, m)`` can fire at a step, ``m`` rising linearly from 1 to the dictionary
    size by ``grow_until`` of the run (the others' encoder bias is held at -1e4 for the step)."""

    grow_until: float = 0.5

    def active_latents(self, step: int) -> int:
        n = self.cfg.dict_size
        return min(n, 1 + math.floor((n - 1) * step / (self.grow_until * self.cfg.steps)))

    def update(self, step: int, x: torch.Tensor) -> float:
        m = self.active_latents(step)
        if m >= self.cfg.dict_size:
            return super().update(step, x)
        held = self.ae.b_enc.data[m:].clone()
        self.ae.b_enc.data[m:] = -1e4
        try:
            return super().update(step, x)
        finally:
            self.ae.b_enc.data[m:] = held


class SwappingTrainer(MatryoshkaBatchTopKTrainer):
    """Swaps child-first latent pairs (see the module's docstring) on the last 10 batches."""

    every: int = 100
    cos_min: float = 0.3

    def __init__(self, **settings: Any):
        super().__init__(**settings)
        self._recent: list[torch.Tensor] = []
        self.swaps = 0

    def update(self, step: int, x: torch.Tensor) -> float:
        loss = super().update(step, x)
        self._recent = (self._recent + [x.detach()])[-10:]
        if self.cfg.warmup_steps <= step < 0.8 * self.cfg.steps and step % self.every == 0:
            self._swap()
        return loss

    @torch.no_grad()
    def _swap(self) -> None:
        ae = self.ae
        centred = torch.cat(self._recent) - ae.b_dec
        pre = torch.relu(centred @ ae.W_enc + ae.b_enc)
        n = pre.shape[1]
        kth = pre.flatten().topk(min(self.cfg.k * pre.shape[0], pre.numel())).values[-1]
        fires = (pre >= kth) & (pre > 0)
        count = fires.sum(0).float()
        cofire = fires.T.float() @ fires.float()
        unit = ae.W_dec / ae.W_dec.norm(dim=1, keepdim=True)
        cos = unit @ unit.T
        proj = centred @ unit.T
        present = (proj >= 0.8 * (proj * fires).sum(0) / count.clamp(min=1)).sum(0).float()
        pairs = sorted(((float(cos[i, j]), i, j) for i in range(n) for j in range(i + 1, n)
                        if cos[i, j] > self.cos_min and count[i] > 0 and count[j] > 0
                        and cofire[i, j] <= 0.05 * min(count[i], count[j]) and present[j] > 1.2 * present[i]),
                       reverse=True)
        perm, used, moved = torch.arange(n), set(), []
        for _, i, j in pairs:
            if i not in used and j not in used:
                used |= {i, j}
                perm[i], perm[j] = j, i
                moved.append(i)
        if not moved:
            return
        self.reorder(perm)
        moments = [v for v in self.optimizer.state.get(ae.W_enc, {}).values()
                   if isinstance(v, torch.Tensor) and v.shape == ae.W_enc.shape]
        for i in moved:
            ae.W_enc[:, i] = ae.W_dec[i] / ae.W_dec[i].norm() * ae.W_enc[:, i].norm()
            for v in moments:
                v[:, i] = 0
        self.swaps += len(moved)


PROTOTYPES = {"grow": GrowingTrainer, "swap": SwappingTrainer}

# 2 parents (p 0.15) with 3 independent children each (p 0.3 given the parent), 3 singletons.
SMALL_TREE = dict(n_trees=2, depth=1, branching=(3, 3), parent_prob=(0.15, 0.15), child_prob=(0.3, 0.3),
                  exclusive_share=0.0, magnitude=(1, 1), firing_noise=0.05, n_singletons=3,
                  singleton_prob=(0.05, 0.05), k_ratio=1.5)


def decoder_cosines(config: str, seed: int = 101, steps: int = 2000) -> tuple[list[str], torch.Tensor]:
    """Train ``config`` on :data:`SMALL_TREE` (tree seed ``seed``, training seed 0); the true
    features' names and ``[latents, features]`` decoder cosines."""
    from benchmarks.toy.config import VariantSpec
    from benchmarks.toy.train import make_trainer
    from matryoshka_plugin.toy import HierarchyParams
    from matryoshka_plugin.toy.hierarchies import random_hierarchy

    spec = random_hierarchy(HierarchyParams(**SMALL_TREE), seed=seed, name="small")
    cfg = config_by_name(config)
    toy = spec.build()
    torch.manual_seed(0)
    trainer = make_trainer(VariantSpec(cfg.name, cfg.family), trainer_kwargs(cfg, spec, 0, steps))
    data = toy.batches(200, seed=10_000)
    for step in range(steps):
        trainer.update(step, next(data))
    W = trainer.ae.W_dec.detach()
    return [f.name for f in toy.features], (W / W.norm(dim=1, keepdim=True)) @ toy.unit_directions.T.float()


def _trained(label: str, tree: str, config: str, seed: int, settings: StudySettings | None,
             build: Any) -> dict[str, Any]:
    """``build(trainer_kwargs, toy)`` -> a trainer with configuration ``config``'s settings on the
    family's ``tree``, trained and measured as the study does."""
    settings = settings or StudySettings()
    spec = family(settings.n_trees)[tree]
    kw = trainer_kwargs(config_by_name(config), spec, seed, settings.steps)
    toy = spec.build()
    torch.manual_seed(seed)
    trainer = build(kw, toy)
    data = toy.batches(settings.batch_size, seed=10_000 + seed)
    for step in range(settings.steps):
        trainer.update(step, next(data))
    return {"tree": tree, "config": config, "prototype": label, "seed": seed,
            **measure_run(trainer.ae.eval(), spec, toy, settings.eval_samples)}


def run_prototype(name: str, tree: str, config: str = "btk_every", seed: int = 0,
                  settings: StudySettings | None = None) -> dict[str, Any]:
    """Train prototype ``name`` with configuration ``config``'s settings on the family's ``tree``
    and measure it as the study does."""
    return _trained(name, tree, config, seed, settings, lambda kw, toy: PROTOTYPES[name](**kw))


def start_at_truth(ae: torch.nn.Module, toy: Any) -> list[int]:
    """Put ``toy``'s true unit feature directions into the first latents of ``ae`` (decoder rows,
    tied encoder columns, zero encoder and decoder biases), shallower features first (then in
    tree order); returns the feature index of each of those latents."""
    depth: list[int] = []
    for p in toy.parent:  # a parent precedes its children in toy.features
        depth.append(0 if p < 0 else depth[p] + 1)
    order = sorted(range(toy.n_features), key=lambda i: (depth[i], i))
    u = toy.unit_directions[order].to(ae.W_dec.dtype)
    with torch.no_grad():
        ae.W_dec[: len(order)] = u
        ae.W_enc[:, : len(order)] = u.T
        ae.b_enc[: len(order)] = 0.0
        ae.b_dec.zero_()
    return order


def run_oracle(tree: str, config: str = "btk_every", seed: int = 0,
               settings: StudySettings | None = None) -> dict[str, Any]:
    """``config`` (a BatchTopK-family configuration) trained on ``tree`` from the true dictionary
    (:func:`start_at_truth`), measured as the study does."""
    from benchmarks.toy.config import VariantSpec
    from benchmarks.toy.train import make_trainer

    cfg = config_by_name(config)

    def build(kw: dict[str, Any], toy: Any) -> Any:
        trainer = make_trainer(VariantSpec(cfg.name, cfg.family), kw)
        start_at_truth(trainer.ae, toy)
        return trainer

    return _trained("oracle", tree, config, seed, settings, build)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prototype", choices=sorted(PROTOTYPES) + ["inspect", "oracle"])
    p.add_argument("trees", nargs="*", help="tree names (default: all 24)")
    p.add_argument("--config", default="btk_every")
    p.add_argument("--out", default="outputs/hierarchy_family_prototypes")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.prototype == "inspect":
        for config in ("btk_every", "btk_none"):
            names, cos = decoder_cosines(config)
            print(f"{config}: decoder cosine of each latent with " + " ".join(f"{n:>6}" for n in names))
            for i, row in enumerate(cos.tolist()):
                print(f"  latent {i:2d}{'':>{len(config) + 26}}" + " ".join(f"{v:+6.2f}" for v in row))
        return
    trees = a.trees or list(family(StudySettings().n_trees))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for tree in trees:
        r = run_oracle(tree, a.config) if a.prototype == "oracle" else run_prototype(a.prototype, tree, a.config)
        (out / f"{a.prototype}_{a.config}_{tree}.json").write_text(json.dumps(r, default=float))
        results.append(r)
        print(f"{tree}: absorption {r['absorption'] or 0:.3f} recovery {r['recovery']:.3f} dead {r['dead_latents']}",
              flush=True)
    print(f"median absorption {statistics.median(r['absorption'] or 0 for r in results):.3f}, "
          f"recovery {statistics.median(r['recovery'] for r in results):.3f} over {len(results)} trees")


if __name__ == "__main__":
    main()
