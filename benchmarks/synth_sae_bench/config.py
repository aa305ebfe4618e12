"""SynthSAEBench protocols (synthetic model, SAE width, L0, samples) and the SAE variants compared.

``full`` is SynthSAEBench-16k as published (Chanin and Garriga-Alonso 2026; SAELens
docs/synth_sae_bench.md and synth-sae-bench-experiments experiments/sweeps/common.py): 16,384
features in d=768, SAEs of width 4096 with Matryoshka widths 128/512/2048/4096, 200M samples,
batch 1024, lr 3e-4, constant schedule. ``cpu`` is the same generator at a quarter of the size
in every count (4,096 features in d=256, 32 hierarchy roots, SAE width 1024, widths
32/128/512/1024), small enough to build on a CPU (build time: docs/synth_sae_bench.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["PROTOCOLS", "PUBLISHED", "Protocol", "Variant", "VARIANTS", "model_config"]


@dataclass(frozen=True)
class Protocol:
    """One benchmark set-up: the synthetic model and the training budget."""

    name: str
    num_features: int
    hidden_dim: int
    root_nodes: int
    width: int
    matryoshka_widths: tuple[int, ...]
    l0s: tuple[int, ...]
    samples: int
    seeds: tuple[int, ...]
    eval_samples: int
    batch_size: int = 1024
    lr: float = 3e-4
    device: str = "cpu"
    epochs: int = 1
    """Passes over the cached training samples (CPU: sampling costs more than a training step)."""
    dead_window: int = 1000
    """Steps without firing after which a latent counts as dead (AuxK) in every SAE (SAELens' default 1000)."""
    fingerprint: str | None = None
    """The fingerprint (``model.fingerprint``) of the model the committed results were measured on;
    a build that differs is reported, since its rows are not comparable with those."""

    def label(self, distinct: int, passes: int = 1, model: str | None = None, dead_window: int | None = None) -> str:
        """The ``protocol`` column: the model (with the first 8 hex digits of its fingerprint), the
        training samples (``distinct`` samples read ``passes`` times: ``262144x4``) and the dead-latent
        window, e.g. ``cpu:4k-d256-w1024@e1f6a4b7:262144x4:dw100``."""
        dw = self.dead_window if dead_window is None else dead_window
        at = f"@{model[:8]}" if model else ""
        samples = f"{distinct}x{passes}" if passes > 1 else f"{distinct}"
        return f"{self.name}:{self.num_features // 1024}k-d{self.hidden_dim}-w{self.width}{at}:{samples}:dw{dw}"


PROTOCOLS = {
    "full": Protocol("full", 16_384, 768, 128, 4096, (128, 512, 2048, 4096), (25, 20), 200_000_000, (0, 1, 2),
                     500_000, device="cuda"),
    "cpu": Protocol("cpu", 4096, 256, 32, 1024, (32, 128, 512, 1024), (12,), 262_144, (0, 1, 2), 16_384,
                    dead_window=100, epochs=4,
                    # built identically with 1 and 2 threads (torch 2.13, SAELens 6.54.12, this machine)
                    fingerprint="e1f6a4b72ee460fd996a004923119d418316c5914ca32cad795b5d95fee8b645"),
}


def model_config(p: Protocol) -> Any:
    """SAELens' ``SyntheticModelConfig`` of SynthSAEBench-16k, resized to ``p`` (seed 42)."""
    from sae_lens.synthetic import (
        FoldedNormalMagnitudeConfig,
        HierarchyConfig,
        LinearMagnitudeConfig,
        LowRankCorrelationConfig,
        OrthogonalizationConfig,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
    )

    return SyntheticModelConfig(
        num_features=p.num_features,
        hidden_dim=p.hidden_dim,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
        hierarchy=HierarchyConfig(
            total_root_nodes=p.root_nodes, branching_factor=4, max_depth=3, mutually_exclusive_portion=1.0,
            mutually_exclusive_min_depth=0, compensate_probabilities=True, scale_children_by_parent=True,
        ),
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
        correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        bias=0.5,
        seed=42,
    )


@dataclass(frozen=True)
class Variant:
    """An SAE trained in the benchmark: this package's trainer with options, or a SAELens SAE.

    The options of a ``matryoshka_plugin`` variant are the trainer's keywords, except these, which
    the benchmark reads (``run._train_ours``): ``trainer`` (``"batchtopk"``, the default:
    ``MatryoshkaBatchTopKTrainer``; ``"logsparsity"``: ``MatryoshkaLogSparsityTrainer`` with its
    L0 controller at the target L0), ``k_anneal`` (fraction of the steps), and the ablations of
    the BatchTopK trainer: ``encoder_gain`` (``W_enc`` times this once the trainer is built),
    ``recon_scale`` (the reconstruction term times this in the training loss), ``grad_clip=False``
    (the trainer's gradient clipping undone before every optimizer step) and
    ``eval_rule="batchtopk"`` (the exported SAE scored as a SAELens BatchTopK SAE: top ``k * B``
    of each eval batch, as SAELens' training SAEs are scored, instead of its JumpReLU threshold).
    """

    name: str
    source: str  # "matryoshka_plugin" or "saelens"
    options: dict = field(default_factory=dict)
    main: bool = False  # trained with every seed; the others with the first seed only
    description: str = ""


VARIANTS = {v.name: v for v in [
    Variant("saelens-batchtopk", "saelens", {"architecture": "batchtopk"}, True, "SAELens BatchTopKTrainingSAE"),
    Variant("saelens-matryoshka", "saelens", {"architecture": "matryoshka", "use_matryoshka_aux_loss": True}, True,
            "SAELens MatryoshkaBatchTopKTrainingSAE, per-level AuxK (as published)"),
    Variant("saelens-matryoshka+unit-init", "saelens",
            {"architecture": "matryoshka", "use_matryoshka_aux_loss": True, "decoder_init_norm": 1.0}, True,
            "SAELens Matryoshka, decoder_init_norm=1.0 (unit decoder rows, W_enc = W_dec.T, as ours)"),
    Variant("saelens-matryoshka+unit-init+gm", "saelens",
            {"architecture": "matryoshka", "use_matryoshka_aux_loss": True, "decoder_init_norm": 1.0,
             "b_dec_init": "geometric_median"}, True,
            "SAELens Matryoshka configured like `matryoshka`: unit init and b_dec at the geometric median"),
    Variant("saelens-matryoshka+unit-decoder", "saelens",
            {"architecture": "matryoshka", "use_matryoshka_aux_loss": True, "decoder_init_norm": 1.0,
             "unit_decoder": True}, True,
            "SAELens Matryoshka, unit init and decoder rows renormalised to 1 after every step (as ours)"),
    Variant("matryoshka", "matryoshka_plugin", {}, True, "fixed groups, equal weights"),
    Variant("matryoshka+zeros+aux", "matryoshka_plugin", {"b_dec_init": "zeros", "matryoshka_aux_loss": True}, True,
            "SAELens' settings as far as the trainer has them: b_dec from zero, per-level AuxK"),
    Variant("matryoshka+zeros+beta0.5", "matryoshka_plugin", {"b_dec_init": "zeros", "balance_beta": 0.5}, True,
            "b_dec from zero, balance weighting beta 0.5"),
    Variant("matryoshka+zeros+beta0.75", "matryoshka_plugin", {"b_dec_init": "zeros", "balance_beta": 0.75}, True,
            "b_dec from zero, balance weighting beta 0.75"),
    Variant("matryoshka+zeros+all", "matryoshka_plugin",
            {"b_dec_init": "zeros", "detach_inner_levels": True, "reorder_by": "frequency", "k_anneal": 0.1,
             "matryoshka_aux_loss": True}, False, "b_dec from zero + detach + reorder + anneal + per-level AuxK"),
    Variant("matryoshka+aux", "matryoshka_plugin", {"matryoshka_aux_loss": True}, False, "per-level AuxK"),
    Variant("matryoshka+detach", "matryoshka_plugin", {"detach_inner_levels": True}, False,
            "stop-gradient between levels"),
    Variant("matryoshka+reorder", "matryoshka_plugin", {"reorder_by": "frequency"}, False,
            "latents reordered by an EMA of firing frequency"),
    Variant("matryoshka+anneal", "matryoshka_plugin", {"k_anneal": 0.1}, False,
            "k from d down to the target over the first tenth"),
    Variant("matryoshka+beta0.75", "matryoshka_plugin", {"balance_beta": 0.75}, False,
            "balance weighting, inner levels by 0.75**depth (feature-hedging remedy)"),
    Variant("matryoshka+all", "matryoshka_plugin",
            {"detach_inner_levels": True, "reorder_by": "frequency", "k_anneal": 0.1, "matryoshka_aux_loss": True},
            True, "detach + reorder + anneal + per-level AuxK"),
    Variant("matryoshka+zeros", "matryoshka_plugin", {"b_dec_init": "zeros"}, True, "b_dec from zero"),
    Variant("matryoshka+zeros+beta0.25", "matryoshka_plugin", {"b_dec_init": "zeros", "balance_beta": 0.25}, True,
            "b_dec from zero, balance weighting beta 0.25"),
    Variant("logsparsity", "matryoshka_plugin", {"trainer": "logsparsity"}, True,
            "MatryoshkaLogSparsityTrainer: random Pareto prefixes, log sparsity penalty, L0 controller at the target "
            "L0; its own optimiser defaults (lr 3e-3, warm-up 100, decay over the last 20%)"),
    # the learning rate, which differs between the log-sparsity trainer's defaults and the protocol
    Variant("matryoshka+zeros+lr3e-3", "matryoshka_plugin", {"b_dec_init": "zeros", "lr": 3e-3}, False,
            "b_dec from zero, lr 3e-3 (the log-sparsity trainer's), constant"),
    Variant("saelens-matryoshka+unit-init+lr3e-3", "saelens",
            {"architecture": "matryoshka", "use_matryoshka_aux_loss": True, "decoder_init_norm": 1.0, "lr": 3e-3},
            False, "saelens-matryoshka+unit-init at lr 3e-3, constant"),
    Variant("logsparsity+lr3e-4", "matryoshka_plugin", {"trainer": "logsparsity", "lr": 3e-4}, False,
            "logsparsity at the protocol's lr 3e-4 (its warm-up and decay kept)"),
    # ablations of the comparison with SAELens (docs/synth_sae_bench.md): benchmark-side options, see _train_ours
    Variant("matryoshka+gain0.01", "matryoshka_plugin", {"encoder_gain": 0.01}, False,
            "W_enc x 0.01 at init (SAELens' starting pre-activation gain with its 0.1 decoder norm)"),
    Variant("matryoshka+zeros+aux+loss4", "matryoshka_plugin",
            {"b_dec_init": "zeros", "matryoshka_aux_loss": True, "recon_scale": 4.0}, False,
            "matryoshka+zeros+aux with the reconstruction term x 4 (SAELens sums the 4 level MSEs)"),
    Variant("matryoshka+zeros+aux+noclip", "matryoshka_plugin",
            {"b_dec_init": "zeros", "matryoshka_aux_loss": True, "grad_clip": False}, False,
            "matryoshka+zeros+aux without gradient clipping"),
    Variant("matryoshka+btk-eval", "matryoshka_plugin", {"eval_rule": "batchtopk"}, False,
            "matryoshka scored as SAELens scores its training SAEs: BatchTopK over each eval batch"),
    Variant("matryoshka+zeros+aux+btk-eval", "matryoshka_plugin",
            {"b_dec_init": "zeros", "matryoshka_aux_loss": True, "eval_rule": "batchtopk"}, False,
            "matryoshka+zeros+aux scored as BatchTopK over each eval batch"),
]}

# Published SynthSAEBench-16k results (width 4096, 200M samples; SAELens docs, mean of seeds).
PUBLISHED = {
    (25, "BatchTopK"): dict(f1=0.7316, mcc=0.7574, uniqueness=0.9837, explained_variance=0.7923),
    (25, "Matryoshka"): dict(f1=0.8793, mcc=0.7927, uniqueness=0.9987, explained_variance=0.7792),
    (20, "BatchTopK"): dict(f1=0.8183, mcc=0.7526, uniqueness=0.9760, explained_variance=0.7889),
    (20, "Matryoshka"): dict(f1=0.8601, mcc=0.7455, uniqueness=0.9874, explained_variance=0.7699),
}
