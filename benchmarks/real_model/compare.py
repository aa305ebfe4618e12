"""Train BatchTopK and log-sparsity Matryoshka SAEs on cached MiniLM activations and compare them.

All trainers run in one ``dictionary_learning.training.trainSAE`` call (the same batches, in
the same order, ``normalize_activations=True``); each SAE is then reloaded from its folder and
measured on held-out tokens from texts the training never saw: L0 (mean active latents per
token), dead latents (the share that never fires on the held-out tokens) and FVU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import harness
from .activations import DEFAULT_CACHE, cached_activations

__all__ = ["trainer_configs", "evaluate", "run", "add_meta_structure"]

PAPER_FRACTIONS = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32]
VARIANTS = ("btk_groups", "btk_none", "log_sparsity", "dl_batchtopk")
DEFAULT_VARIANTS = ("btk_groups", "btk_none", "log_sparsity")


def batches(acts: torch.Tensor, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless float32 batches, reshuffled every pass (trainSAE's norm factor reads 100 first)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(acts.shape[0], generator=gen)
        for i in range(0, acts.shape[0] - batch_size + 1, batch_size):
            yield acts[perm[i : i + batch_size]].float()


def trainer_configs(
    steps: int, d: int, dict_size: int, k: int, variants: tuple[str, ...] = DEFAULT_VARIANTS,
    log_kwargs: dict[str, Any] | None = None, seed: int = 0, extra_log: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """trainSAE configs; each dict of ``extra_log`` adds a log-sparsity trainer with those keywords."""
    from matryoshka_plugin import MatryoshkaBatchTopKTrainer, MatryoshkaLogSparsityTrainer

    common = dict(steps=steps, activation_dim=d, dict_size=dict_size, layer=3, lm_name="all-MiniLM-L6-v2",
                  submodule_name="encoder.layer.3.output", device="cpu", seed=seed)
    # BatchTopK's warm-up and threshold defaults assume ~1e5 steps: scale them to the run.
    warm = max(1, min(1000, steps // 10))
    # The inference threshold's EMA (default beta 0.999) would still remember the first,
    # larger activations at the end of a short run (held-out L0 10.6 for k = 32 after 256 steps).
    btk = dict(trainer=MatryoshkaBatchTopKTrainer, k=k, warmup_steps=warm, threshold_start_step=warm,
               threshold_beta=max(0.9, 1 - 10 / steps), decay_start=int(0.8 * steps), **common)
    out = []
    for v in variants:
        if v == "btk_groups":
            out.append({**btk, "prefix_mode": "groups", "group_fractions": PAPER_FRACTIONS, "wandb_name": v})
        elif v == "btk_none":
            out.append({**btk, "prefix_mode": "none", "wandb_name": v})
        elif v == "dl_batchtopk":
            # dictionary_learning's own BatchTopK trainer with the same schedule
            from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer

            out.append({**btk, "trainer": BatchTopKTrainer, "wandb_name": v})
        elif v == "log_sparsity":
            out.append(dict(trainer=MatryoshkaLogSparsityTrainer, target_l0=k, wandb_name=v, **common,
                            **(log_kwargs or {})))
        else:
            raise ValueError(f"unknown variant {v!r}; choose from {VARIANTS}")
    for i, kw in enumerate(extra_log or []):
        out.append(dict(trainer=MatryoshkaLogSparsityTrainer, target_l0=k, **common,
                        **{**(log_kwargs or {}), **kw}, wandb_name=f"log_sparsity_{i + 1}"))
    return out


@torch.no_grad()
def evaluate(ae: torch.nn.Module, held_out: torch.Tensor, chunk: int = 8192) -> dict[str, float]:
    """Held-out L0, dead share (never fires on any held-out token) and FVU."""
    n = ae.dict_size
    fired = torch.zeros(n, dtype=torch.bool)
    active, sq_err, tokens = 0.0, 0.0, 0
    x_all = held_out.float()
    total_var = float((x_all - x_all.mean(0)).pow(2).sum())
    for i in range(0, x_all.shape[0], chunk):
        x = x_all[i : i + chunk]
        f = ae.encode(x)
        on = f != 0
        fired |= on.any(0)
        active += float(on.sum())
        sq_err += float((x - ae.decode(f)).pow(2).sum())
        tokens += x.shape[0]
    return {"l0": active / tokens, "dead_fraction": 1.0 - float(fired.float().mean()), "fvu": sq_err / total_var}


def run(
    out_dir: str | Path, train_tokens: int = 1_048_576, held_out_tokens: int = 65_536, batch_size: int = 1024,
    dict_size: int = 4096, k: int = 32, variants: tuple[str, ...] = DEFAULT_VARIANTS,
    log_kwargs: dict[str, Any] | None = None, cache_dir: str | Path = DEFAULT_CACHE, seed: int = 0,
    extra_log: list[dict[str, Any]] | None = None, autocast_dtype: torch.dtype = torch.float32,
) -> dict[str, dict[str, Any]]:
    """Train ``variants`` with trainSAE on cached activations (in bf16 with
    ``autocast_dtype=torch.bfloat16``: trainSAE then passes bf16 batches on CPU) and evaluate them."""
    from dictionary_learning.training import trainSAE

    from matryoshka_plugin import load_dictionary

    out_dir = Path(out_dir)
    train = cached_activations(train_tokens, held_out=False, cache_dir=cache_dir)
    held_out = cached_activations(held_out_tokens, held_out=True, cache_dir=cache_dir)
    d = train.shape[1]
    steps = train_tokens // batch_size
    configs = trainer_configs(steps, d, dict_size, k, tuple(variants), log_kwargs, seed, extra_log)
    names = list(variants) + [f"log_sparsity_{i + 1}" for i in range(len(extra_log or []))]
    print(f"training {', '.join(variants)} on {steps} steps x {batch_size} tokens (d={d}, {dict_size} latents, k={k})")
    t0 = time.time()
    trainSAE(data=batches(train, batch_size, seed), trainer_configs=configs, steps=steps, save_dir=str(out_dir),
             normalize_activations=True, device="cpu", autocast_dtype=autocast_dtype)
    wall = time.time() - t0
    results: dict[str, dict[str, Any]] = {}
    for i, v in enumerate(names):
        ae, cfg = load_dictionary(out_dir / f"trainer_{i}")
        results[v] = {**evaluate(ae, held_out), "train_tokens": steps * batch_size, "wall_s_all_trainers": wall,
                      "config": {key: val for key, val in cfg["trainer"].items() if not isinstance(val, (list, dict))}}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(format_table(results))
    return results


def add_meta_structure(out_dir: str | Path, seeds: list[int], device: str = "cpu",
                       **config: Any) -> dict[str, dict[str, Any]]:
    """SAEBench's meta-structure eval (a BatchTopK meta-SAE on the decoder rows; SAEBench's
    settings, ``config`` overrides them) of every SAE in ``out_dir/results.json``, one meta-SAE per
    seed; adds ``meta_structure`` (mean, std, per seed) to each entry and rewrites the file."""
    from matryoshka_plugin import load_dictionary
    from matryoshka_plugin.io import atomic_write_json

    out_dir = Path(out_dir)
    results = json.loads((out_dir / "results.json").read_text())

    def put(v: str, got: dict[str, Any]) -> None:
        results[v]["meta_structure"] = {**got, "seeds": seeds, "config": config}
        print(f"{v}: meta-SAE variance explained {got['variance_explained']:.4f} "
              f"(seeds {seeds}, {got['seconds']:.0f} s)", flush=True)

    runs = ((v, lambda i=i: load_dictionary(out_dir / f"trainer_{i}")[0], seeds) for i, v in enumerate(results))
    harness.add_meta_structure(runs, have=lambda v: False, put=put, device=device, **config)
    atomic_write_json(results, out_dir / "results.json", indent=2, default=str)
    print(format_table(results))
    return results


def format_table(results: dict[str, dict[str, Any]]) -> str:
    meta = any("meta_structure" in r for r in results.values())
    rows = []
    for v, r in results.items():
        m = r.get("meta_structure")
        row = [v, f"{r['l0']:.1f}", f"{100 * r['dead_fraction']:.1f}%", f"{r['fvu']:.3f}"]
        if meta:
            row.append(harness.fmt_mean_std(m and m["variance_explained"], m and (m["variance_explained_std"] or None)))
        rows.append(row)
    return harness.markdown_table(["trainer", "held-out L0", "dead latents", "FVU"] + ["meta-SAE var. expl."] * meta, rows)
