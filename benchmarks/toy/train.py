"""Train and evaluate one SAE on one toy set-up (one seed): the unit the runner caches.

A trained SAE is saved as ``trainSAE`` saves one: ``<save_dir>/trainer_0/ae.pt`` and
``config.json`` (``{"trainer": trainer.config, "buffer": ...}``), which
``matryoshka_plugin.load_dictionary`` reads back.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from matryoshka_plugin.checkpoints import load_dictionary
from matryoshka_plugin.io import atomic_torch_save, atomic_write_json
from matryoshka_plugin.toy import (
    SyntheticHierarchyToy,
    ToyModel,
    eval_sae_lens_synthetic,
    evaluate_sae,
    mixing_metrics,
)
from matryoshka_plugin.trainers import MatryoshkaBatchTopKTrainer, MatryoshkaLogSparsityTrainer

from .config import BTK_DEFAULTS, LOG_DEFAULTS, SetupConfig, VariantSpec, parse_variant

# Toy models are deterministic given their settings; build each once per process.
_TOYS: dict[str, Any] = {}


def build_toy(setup: SetupConfig):
    """The set-up's toy model (feature directions fixed by ``setup.toy['seed']``, default 0)."""
    key = f"{setup.builder}:{sorted(setup.toy.items())}"
    if key not in _TOYS:
        kw = dict(setup.toy)
        for name in ("child_probs", "branching"):
            if isinstance(kw.get(name), list):
                kw[name] = tuple(kw[name])
        if setup.builder == "post_tree":
            toy = ToyModel.post_tree(**kw)
        elif setup.builder == "hedging_tree":
            toy = ToyModel.hedging_tree(**kw)
        elif setup.builder == "magnitude_tree":
            toy = ToyModel.magnitude_tree(**kw)
        elif setup.builder == "synthetic_hierarchy":
            toy = SyntheticHierarchyToy(**kw)
        else:
            raise ValueError(f"unknown toy builder {setup.builder!r}")
        toy.true_l0 = toy.expected_l0()
        _TOYS[key] = toy
    return _TOYS[key]


def group_sizes(setup: SetupConfig, toy, dict_size: int) -> list[int]:
    """Nested group sizes: the set-up's, or one group per level of the hierarchy."""
    sizes = setup.group_sizes
    if sizes is None:
        sizes = toy.level_sizes() if hasattr(toy, "level_sizes") else [dict_size]
        # Merge the deepest level with the singletons: the last group takes the remainder.
        if len(sizes) > 2:
            sizes = sizes[:-2] + [sizes[-2] + sizes[-1]]
        sizes = list(sizes[:-1]) + [dict_size - sum(sizes[:-1])]
    if sum(sizes) != dict_size:
        raise ValueError(f"group sizes {sizes} of set-up {setup.name!r} do not sum to dict_size {dict_size}")
    return [int(s) for s in sizes]


def run_key(variant: str, k: int | None) -> str:
    return variant if k is None else f"{variant}/k{k}"


def trainer_kwargs(setup: SetupConfig, spec: VariantSpec, seed: int, k: int | None, toy) -> dict[str, Any]:
    """Everything that defines the run (stored with its metrics; a change forces a rerun)."""
    n = spec.dict_size or setup.dict_size or toy.n_features
    steps = int(setup.steps)
    base = dict(steps=steps, activation_dim=toy.d, dict_size=n, seed=seed, device="cpu")
    if spec.family == "log":
        target = setup.target_l0 if setup.target_l0 is not None else 1.1 * toy.true_l0
        if spec.dict_size == 1:  # one latent: aim at 1.1 x the firing rate of feature 0 (the first root)
            rate = toy.sample_features(50_000, torch.Generator().manual_seed(1))[:, 0].gt(0).float().mean().item()
            target = 1.1 * max(rate, 1e-3)
        kw = {**base, **LOG_DEFAULTS, **setup.log, "target_l0": round(float(target), 6), "prefix_mode": spec.prefix_mode}
        if spec.prefix_mode == "groups":
            # Fixed groups are fixed positions (as in Bussmann et al. and the hedging critique):
            # reordering latents every step would move latents between groups.
            kw["reorder_latents"] = False
            sizes = group_sizes(setup, toy, n)
            kw["group_fractions"] = [s / n for s in sizes]
            if spec.balance_beta is not None:
                kw["balance_beta"] = spec.balance_beta
        return kw
    # BatchTopK: this package's trainer and the upstream ones share lr/schedule/threshold settings.
    warm = min(1000, steps // 10)
    kw = {**base, **BTK_DEFAULTS, "k": int(k), "warmup_steps": warm, "threshold_start_step": warm,
          "decay_start": int(0.8 * steps), **setup.btk}
    if spec.family == "btk":
        kw["prefix_mode"] = spec.prefix_mode
        if spec.prefix_mode == "groups":
            kw["group_fractions"] = [s / n for s in group_sizes(setup, toy, n)]
            if spec.balance_beta is not None:
                kw["balance_beta"] = spec.balance_beta
    elif spec.family in ("up_btk", "up_mbtk"):
        kw.update(layer=0, lm_name=f"toy:{setup.name}")
        if spec.family == "up_mbtk":
            kw["group_fractions"] = [s / n for s in group_sizes(setup, toy, n)]
    return kw


# Upstream trainers hard-code these in __init__; the benchmark sets them as attributes.
UPSTREAM_ATTRIBUTES = ("dead_feature_threshold", "top_k_aux")


def make_trainer(spec: VariantSpec, kw: dict[str, Any]):
    if spec.family == "log":
        return MatryoshkaLogSparsityTrainer(**kw)
    if spec.family == "btk":
        return MatryoshkaBatchTopKTrainer(**kw)
    attrs = {a: kw[a] for a in UPSTREAM_ATTRIBUTES if a in kw}
    kw = {key: v for key, v in kw.items() if key not in UPSTREAM_ATTRIBUTES}
    if spec.family == "up_btk":
        from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer

        tr = BatchTopKTrainer(**kw)
    elif spec.family == "up_mbtk":
        from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer as Upstream

        tr = Upstream(**kw)
        _check_upstream_groups(tr, kw)
    else:
        raise ValueError(f"unknown family {spec.family!r}")
    for a, v in attrs.items():
        setattr(tr, a, v)
    return tr


def _check_upstream_groups(tr, kw) -> None:
    """Upstream computes group sizes with int(f * n); make sure they are the intended ones."""
    n = kw["dict_size"]
    want = [round(f * n) for f in kw["group_fractions"]]
    if list(tr.group_sizes) != want:
        raise ValueError(f"upstream group sizes {tr.group_sizes} differ from {want}; adjust group_sizes")


def train_and_evaluate(setup: SetupConfig, variant: str, seed: int, k: int | None = None,
                       progress=None, save_dir: str | Path | None = None) -> tuple[dict[str, Any], torch.nn.Module]:
    """Train one SAE with a plain ``trainer.update(step, x)`` loop (what ``trainSAE`` does
    without logging) and measure it. With ``save_dir`` the SAE is saved as ``trainSAE`` saves
    it (:func:`save_trainer`). Returns ``(record, sae)``."""
    spec = parse_variant(variant)
    toy = build_toy(setup)
    kw = trainer_kwargs(setup, spec, seed, k if spec.uses_k else None, toy)
    torch.manual_seed(seed)
    trainer = make_trainer(spec, kw)
    data = toy.batches(setup.batch_size, seed=10_000 + seed)
    t0 = time.perf_counter()
    losses = []
    for step in range(kw["steps"]):
        loss = trainer.update(step, next(data))
        if step >= kw["steps"] - 100:
            losses.append(float(loss))
        if progress is not None and (step + 1) % 500 == 0:
            progress(500)
    train_s = time.perf_counter() - t0
    sae = trainer.ae.eval()
    if save_dir is not None:
        save_trainer(trainer, Path(save_dir) / "trainer_0", buffer_config(setup, seed))
    record = {
        "setup": setup.name,
        "variant": variant,
        "k": k if spec.uses_k else None,
        "seed": seed,
        "trainer": {key: v for key, v in kw.items() if key not in ("device",)},
        "toy": dict(setup.toy, builder=setup.builder, true_l0=toy.true_l0),
        "train_seconds": train_s,
        "final_loss": float(sum(losses) / max(len(losses), 1)),
        **measure(sae, toy, setup),
    }
    if hasattr(trainer, "controller"):
        record["final_sparsity_coeff"] = float(trainer.controller.coefficient)
    return record, sae


def measure(sae: torch.nn.Module, toy, setup: SetupConfig) -> dict[str, Any]:
    """The ground-truth metrics of one SAE (JSON-ready)."""
    m = evaluate_sae(sae, toy, n_samples=setup.eval_samples)
    mix = mixing_metrics(m, toy)
    out = {
        "absorption": m.absorption,
        "absorption_per_parent": m.absorption_per_parent,
        "absorption_best": m.absorption_best,
        "absorption_best_per_parent": m.absorption_best_per_parent,
        "recovery": m.recovery,
        "mean_max_cosine": m.mean_max_cosine,
        "l0": m.l0,
        "fvu": m.fvu,
        "matching": m.matching,
        "mixing_parent_child": mix.parent_child,
        "mixing_parent_child_signed": mix.parent_child_signed,
        "mixing_sibling": mix.sibling,
        "mixing_sibling_signed": mix.sibling_signed,
        "mixing_child_parent_signed": mix.child_parent_signed,
        "mixing_per_parent": mix.per_parent,
        "dead_latents": int(_dead_latents(sae, toy)),
    }
    if isinstance(toy, SyntheticHierarchyToy):
        out.update({f"saelens_{key}": v for key, v in eval_sae_lens_synthetic(sae, toy, setup.eval_samples).items()})
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


@torch.no_grad()
def _dead_latents(sae, toy, n: int = 20_000) -> int:
    _, x = toy.sample(n, torch.Generator().manual_seed(99))
    f = sae.encode(x)
    return int((f.ne(0).sum(0) == 0).sum())


# -- storing trained SAEs as trainSAE does (for figures and re-measuring without retraining) ---


def buffer_config(setup: SetupConfig, seed: int) -> dict[str, Any]:
    """The activation stream of a run, in place of ``trainSAE``'s ``data.config``."""
    return {"toy": dict(setup.toy, builder=setup.builder), "batch_size": setup.batch_size, "seed": 10_000 + seed}


def save_trainer(trainer, folder: Path, buffer: dict[str, Any]) -> None:
    """``folder/ae.pt`` (the SAE's state dict on CPU) and ``folder/config.json`` (``{"trainer":
    trainer.config, "buffer": buffer}``), as ``trainSAE`` writes a ``trainer_i`` folder; each
    file is replaced atomically."""
    state = {key: v.detach().cpu() for key, v in trainer.ae.state_dict().items()}
    atomic_torch_save(state, folder / "ae.pt")
    atomic_write_json({"trainer": trainer.config, "buffer": buffer}, folder / "config.json", indent=4)


def load_sae(folder: str | Path) -> torch.nn.Module:
    """The SAE of a ``trainer_0`` folder written by :func:`save_trainer` (or ``trainSAE``)."""
    sae, _ = load_dictionary(folder)
    return sae.eval()
