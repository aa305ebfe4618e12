"""The main job on an embedded default: absorption and its cure on the post's toy tree.

Trains a vanilla log-sparsity SAE and a Matryoshka one (10 random prefixes per step) with
dictionary_learning's ``trainSAE`` on the original post's feature tree, reloads them with
``load_dictionary``, prints an absorption table and writes the figures as PNG.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dictionary_learning.training import trainSAE

from .checkpoints import load_dictionary
from .threads import cpu_threads, threads_for
from .toy import ToyMetrics, ToyModel, evaluate_sae
from .toy.plots import plot_activations, plot_decoder_cosine
from .trainers import MatryoshkaLogSparsityTrainer

__all__ = ["DemoConfig", "run_demo", "format_table"]

# name -> prefix mode of the log-sparsity trainer
DEMO_SAES = {
    "vanilla": "none",
    "matryoshka": "pareto",
    "matryoshka_expected": "pareto_expected",
    "matryoshka_every": "every",
}


@dataclass
class DemoConfig:
    """Settings of the demo; defaults follow the post's reference code, with fewer steps."""

    out_dir: str = "outputs/demo"
    steps: int = 12_000
    batch_size: int = 200
    d: int = 20
    dict_size: int = 20
    target_l0: float = 1.2338
    sparsity_coeff: float = 0.2
    lr: float = 3e-2
    normalize_decoder: bool = False  # the post's free decoder norms
    seed: int = 0
    saes: list[str] = field(default_factory=lambda: ["vanilla", "matryoshka"])
    eval_samples: int = 20_000


def _check(cfg: DemoConfig) -> None:
    unknown = [s for s in cfg.saes if s not in DEMO_SAES]
    if unknown:
        raise ValueError(f"unknown demo SAE(s) {unknown}; choose from {list(DEMO_SAES)}")
    if not cfg.saes or len(set(cfg.saes)) != len(cfg.saes):
        raise ValueError(f"name each demo SAE once (choose from {list(DEMO_SAES)}), got {cfg.saes}")
    for key in ("steps", "batch_size", "d", "dict_size", "eval_samples"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def run_demo(cfg: DemoConfig) -> dict[str, ToyMetrics]:
    """Train, evaluate and plot the demo SAEs; bad settings raise ``ValueError`` before anything is written."""
    _check(cfg)
    # Toy shapes: data generation and evaluation run faster on one thread too (threads.py).
    with cpu_threads(threads_for(cfg.batch_size * cfg.d * cfg.dict_size)):
        return _run_demo(cfg)


def _run_demo(cfg: DemoConfig) -> dict[str, ToyMetrics]:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    toy = ToyModel.post_tree(d=cfg.d, seed=cfg.seed)
    configs = [
        dict(
            trainer=MatryoshkaLogSparsityTrainer,
            steps=cfg.steps,
            activation_dim=cfg.d,
            dict_size=cfg.dict_size,
            layer=0,
            lm_name="toy:post_tree",
            target_l0=cfg.target_l0,
            prefix_mode=DEMO_SAES[name],
            sparsity_coeff=cfg.sparsity_coeff,
            lr=cfg.lr,
            normalize_decoder=cfg.normalize_decoder,
            seed=cfg.seed,
            device="cpu",
            wandb_name=name,
        )
        for name in cfg.saes
    ]
    print(f"Training {', '.join(cfg.saes)} on the post's toy tree ({toy.n_features} features, "
          f"d={cfg.d}, true L0={toy.expected_l0():.3f}) for {cfg.steps} steps")
    trainSAE(
        data=toy.batches(cfg.batch_size, seed=cfg.seed),
        trainer_configs=configs,
        steps=cfg.steps,
        save_dir=str(out / "runs"),
        device="cpu",
    )
    saes, metrics = {}, {}
    for i, name in enumerate(cfg.saes):
        ae, _ = load_dictionary(out / "runs" / f"trainer_{i}")
        saes[name] = ae
        metrics[name] = evaluate_sae(ae, toy, n_samples=cfg.eval_samples)
    table = format_table(metrics)
    print(table)
    (out / "absorption_table.md").write_text(table + "\n")
    summary = {
        name: {k: v for k, v in m._asdict().items() if k not in ("decoder_cosine",)}
        for name, m in metrics.items()
    }
    (out / "metrics.json").write_text(json.dumps({"config": asdict(cfg), "metrics": summary}, indent=2))
    act_png = plot_activations(toy, saes, metrics, out / "activations.png")
    cos_png = plot_decoder_cosine(toy, metrics, out / "decoder_cosine.png")
    print(f"Wrote {act_png}, {cos_png}, {out / 'absorption_table.md'} and the SAEs under {out / 'runs'}")
    return metrics


def format_table(metrics: dict[str, ToyMetrics]) -> str:
    """Markdown table of the headline toy metrics."""
    first = next(iter(metrics.values()))
    n_parents = len(first.absorption_per_parent)
    head = ["SAE", "absorption"] + [f"parent {i}" for i in range(n_parents)] + ["recovery", "L0", "FVU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in metrics.items():
        row = [name, f"{m.absorption:.3f}"] + [f"{a:.3f}" for a in m.absorption_per_parent]
        row += [f"{m.recovery:.3f}", f"{m.l0:.3f}", f"{m.fvu:.4f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
