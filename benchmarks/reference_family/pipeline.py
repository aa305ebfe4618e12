"""Train the reference family and the large SAEs, measure them, write the report.

Every SAE is trained in its own ``dictionary_learning.training.trainSAE`` call on the same
batches (same seed, ``normalize_activations=True``) and moved into ``<out>/saes/<name>/`` only
when finished; a later run skips finished SAEs and cached measurements (``metrics.json`` per SAE,
``correlations.json``), so the command resumes where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from benchmarks.harness import csv_text, markdown_table
from benchmarks.real_model.compare import PAPER_FRACTIONS, batches, evaluate

__all__ = ["Plan", "FULL", "QUICK", "LARGE_VARIANTS", "sae_configs", "run"]

LARGE_VARIANTS = ("vanilla", "mat_groups", "mat_every", "log_sparsity", "log_none")
LABELS = {
    "vanilla": "vanilla BatchTopK (dictionary_learning)",
    "mat_groups": "Matryoshka BatchTopK, groups",
    "mat_every": "Matryoshka BatchTopK, every prefix",
    "log_sparsity": "Matryoshka log sparsity (target L0 = k)",
    "log_none": "log sparsity without prefixes (its vanilla)",
}


@dataclass(frozen=True)
class Plan:
    """Sizes of one run."""

    reference_sizes: tuple[int, ...]
    large_size: int
    k: int
    train_tokens: int
    held_out_tokens: int
    """Held-out tokens for FVU, L0, dead latents and the correlations."""
    batch_size: int = 1024
    sample_tokens: int = 6000
    """Held-out tokens with text (for the tree view)."""
    variants: tuple[str, ...] = LARGE_VARIANTS
    seed: int = 0

    def reference_k(self, size: int) -> int:
        """A reference SAE's k: the large SAEs' k, at most a quarter of its latents (so the
        smallest references are sparse too)."""
        return max(1, min(self.k, size // 4))


FULL = Plan(reference_sizes=(32, 128, 512), large_size=2048, k=32, train_tokens=262_144, held_out_tokens=32_768,
            batch_size=512)
QUICK = Plan(reference_sizes=(16, 64), large_size=256, k=16, train_tokens=32_768, held_out_tokens=8192,
             batch_size=512, sample_tokens=1500)


def sae_configs(plan: Plan, d: int) -> dict[str, dict[str, Any]]:
    """trainSAE config per SAE name: ``ref_<size>`` references, then the large variants."""
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer

    from matryoshka_plugin import MatryoshkaBatchTopKTrainer, MatryoshkaLogSparsityTrainer

    steps = plan.train_tokens // plan.batch_size
    common = dict(steps=steps, activation_dim=d, layer=3, lm_name="all-MiniLM-L6-v2",
                  submodule_name="encoder.layer.3.output", device="cpu", seed=plan.seed)
    # BatchTopK's warm-up and threshold defaults assume ~1e5 steps: scale them to the run (as
    # benchmarks/real_model does; see docs/real_model.md).
    warm = max(1, min(1000, steps // 10))
    btk = dict(warmup_steps=warm, threshold_start_step=warm, threshold_beta=max(0.9, 1 - 10 / steps),
               decay_start=int(0.8 * steps), **common)
    out: dict[str, dict[str, Any]] = {}
    for size in plan.reference_sizes:
        out[f"ref_{size}"] = dict(trainer=BatchTopKTrainer, dict_size=size, k=plan.reference_k(size),
                                  wandb_name=f"ref_{size}", **btk)
    large = dict(dict_size=plan.large_size, **btk)
    for v in plan.variants:
        if v == "vanilla":
            out[v] = dict(trainer=BatchTopKTrainer, k=plan.k, wandb_name=v, **large)
        elif v == "mat_groups":
            out[v] = dict(trainer=MatryoshkaBatchTopKTrainer, k=plan.k, prefix_mode="groups",
                          group_fractions=PAPER_FRACTIONS, wandb_name=v, **large)
        elif v == "mat_every":
            out[v] = dict(trainer=MatryoshkaBatchTopKTrainer, k=plan.k, prefix_mode="every", wandb_name=v, **large)
        elif v in ("log_sparsity", "log_none"):
            # log_none: the same SAE, penalty and controller with the prefix loss off (the post's vanilla).
            mode = {} if v == "log_sparsity" else {"prefix_mode": "none"}
            out[v] = dict(trainer=MatryoshkaLogSparsityTrainer, dict_size=plan.large_size, target_l0=plan.k,
                          warmup_steps=warm, wandb_name=v, **mode, **common)
        else:
            raise ValueError(f"unknown large variant {v!r}; choose from {LARGE_VARIANTS}")
    return out


def train_one(name: str, config: dict[str, Any], train: torch.Tensor, plan: Plan, saes_dir: Path) -> Path:
    """Train one SAE into ``saes_dir/name`` unless it is already there (finished)."""
    from dictionary_learning.training import trainSAE

    final = saes_dir / name
    if (final / "ae.pt").is_file() and (final / "config.json").is_file():
        return final
    tmp = saes_dir / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    steps = plan.train_tokens // plan.batch_size
    print(f"training {name} ({config['dict_size']} latents) on {steps} steps x {plan.batch_size} tokens", flush=True)
    t0 = time.time()
    trainSAE(data=batches(train, plan.batch_size, plan.seed), trainer_configs=[config], steps=steps,
             save_dir=str(tmp), normalize_activations=True, device="cpu")
    (tmp / "trainer_0" / "wall_s.txt").write_text(f"{time.time() - t0:.1f}\n")
    (tmp / "trainer_0").rename(final)
    shutil.rmtree(tmp, ignore_errors=True)
    return final


def _check_plan(path: Path, plan: Plan) -> None:
    """Resume only the same plan: SAEs trained under another one would be mixed in silently.
    The large variants may differ (each SAE is trained on its own, from the same settings)."""
    from matryoshka_plugin.io import atomic_write_json

    want = json.loads(json.dumps(asdict(plan)))
    if path.is_file():
        have = json.loads(path.read_text())
        have["variants"] = want["variants"]
        if have != want:
            diff = {k: (have.get(k), want[k]) for k in want if have.get(k) != want[k]}
            raise ValueError(f"{path.parent} holds a run of another plan ({diff}, as (saved, asked)); "
                             "use another --out folder or delete that one")
    else:
        atomic_write_json(want, path)


def _correlations(path: Path, saes: dict[str, Any], large: list[str], refs: list[str],
                  held_out: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Mean max correlation of every (large SAE, reference) pair, cached per pair in ``path``."""
    from matryoshka_plugin.analysis import mean_max_correlation
    from matryoshka_plugin.io import atomic_write_json

    cached: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}
    for v in large:
        for r in refs:
            if r in cached.get(v, {}):
                continue
            t0 = time.time()
            res = mean_max_correlation(saes[r], saes[v], held_out.float())
            cached.setdefault(v, {})[r] = {
                "mean": res.mean, "n_dead_reference": res.n_dead_reference, "n_dead_other": res.n_dead_other,
                "n_tokens": res.n_tokens, "max_corr": res.max_corr.tolist(), "seconds": time.time() - t0}
            atomic_write_json(cached, path)
            print(f"mean max correlation {r} -> {v}: {res.mean:.4f} ({time.time() - t0:.1f} s)", flush=True)
    return {v: {r: cached[v][r] for r in refs} for v in large}


def _cached_json(path: Path, compute: Callable[[], Any]) -> Any:
    from matryoshka_plugin.io import atomic_write_json

    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    atomic_write_json(value, path)
    return value


def run(
    out_dir: str | Path, plan: Plan, train: torch.Tensor, held_out: torch.Tensor,
    sample: tuple[torch.Tensor, Sequence[Any]] | None = None, report_dir: str | Path | None = None,
    tree_roots: int = 4,
) -> dict[str, Any]:
    """Train what is missing, measure every SAE, and write ``results.{md,csv,json}``, the figure
    and (with a ``sample`` of activations and snippets) the tree view into ``report_dir``."""
    from matryoshka_plugin import load_dictionary
    from matryoshka_plugin.analysis import prefix_fvu
    from matryoshka_plugin.io import atomic_open, atomic_write_json

    out_dir = Path(out_dir)
    report = Path(report_dir) if report_dir is not None else out_dir
    saes_dir = out_dir / "saes"
    saes_dir.mkdir(parents=True, exist_ok=True)
    _check_plan(out_dir / "plan.json", plan)
    report.mkdir(parents=True, exist_ok=True)
    configs = sae_configs(plan, train.shape[1])
    for name, cfg in configs.items():
        train_one(name, cfg, train, plan, saes_dir)
    saes = {name: load_dictionary(saes_dir / name)[0].eval() for name in configs}
    refs = [f"ref_{s}" for s in plan.reference_sizes]
    large = list(plan.variants)

    metrics: dict[str, dict[str, Any]] = {}
    for name, sae in saes.items():
        def measure(sae=sae, name=name) -> dict[str, Any]:
            m = evaluate(sae, held_out)
            m["wall_s"] = float((saes_dir / name / "wall_s.txt").read_text())
            if name in ("mat_groups", "mat_every"):
                widths = [int(f * plan.large_size) for f in torch.tensor(PAPER_FRACTIONS).cumsum(0).tolist()]
                curve = prefix_fvu(sae, held_out, [w for w in widths if 0 < w <= plan.large_size])
                m["prefix_fvu"] = dict(zip(map(str, curve.widths), curve.fvu.tolist()))
            return m

        metrics[name] = _cached_json(saes_dir / name / "metrics.json", measure)

    corr = _correlations(out_dir / "correlations.json", saes, large, refs, held_out)
    results = {"plan": asdict(plan), "metrics": metrics, "mean_max_correlation": corr}

    atomic_write_json({**results, "mean_max_correlation": {v: {r: {k: x for k, x in c.items() if k != "max_corr"}
                                                                   for r, c in row.items()} for v, row in corr.items()}},
                      report / "results.json")
    with atomic_open(report / "results.csv") as f:
        f.write(results_csv(plan, metrics, corr))
    with atomic_open(report / "results.md") as f:
        f.write(results_markdown(plan, metrics, corr))
    plot(plan, corr, report / "mean_max_correlation.png")
    if sample is not None:
        from matryoshka_plugin.tree_view import Level, prefix_levels, write_tree_view

        acts, snippets = sample
        top = "mat_groups" if "mat_groups" in saes else large[0]
        levels = [Level(r, saes[r]) for r in refs] + [Level(top, saes[top])]
        write_tree_view(report / "tree.html", levels, acts, snippets, n_roots=tree_roots, children=3,
                        title=f"MiniLM block 3: reference family {' -> '.join(refs)} -> {top}")
        if "mat_groups" in saes:  # the Matryoshka SAE's own nested groups as levels
            write_tree_view(report / "tree_prefixes.html", prefix_levels(saes["mat_groups"], name="mat_groups")[:4],
                            acts, snippets, n_roots=tree_roots, children=3,
                            title="MiniLM block 3: the nested groups of the Matryoshka BatchTopK SAE")
    return results


def _size(plan: Plan, name: str) -> int:
    return int(name.split("_")[1]) if name.startswith("ref_") else plan.large_size


def results_csv(plan: Plan, metrics: dict[str, dict[str, Any]], corr: dict[str, dict[str, Any]]) -> str:
    refs = [f"ref_{s}" for s in plan.reference_sizes]
    rows = [{"sae": name, "latents": _size(plan, name), "l0": f"{m['l0']:.3f}", "fvu": f"{m['fvu']:.5f}",
             "dead_fraction": f"{m['dead_fraction']:.5f}", "train_wall_s": f"{m['wall_s']:.0f}",
             **{f"mmc_{r}": f"{corr[name][r]['mean']:.5f}" if name in corr else "" for r in refs}}
            for name, m in metrics.items()]
    fields = ["sae", "latents", "l0", "fvu", "dead_fraction", "train_wall_s"] + [f"mmc_{r}" for r in refs]
    return csv_text(rows, fields, lineterminator="\n")


def results_markdown(plan: Plan, metrics: dict[str, dict[str, Any]], corr: dict[str, dict[str, Any]]) -> str:
    refs = [f"ref_{s}" for s in plan.reference_sizes]
    lines = [
        f"Train tokens {plan.train_tokens:,} (batch {plan.batch_size}), held-out tokens {plan.held_out_tokens:,}; "
        f"large SAEs {plan.large_size} latents at k = {plan.k}; references {', '.join(map(str, plan.reference_sizes))} "
        f"latents (k = {', '.join(str(plan.reference_k(s)) for s in plan.reference_sizes)}).",
        "",
        "Mean max correlation (held-out tokens; each reference latent's best Pearson correlation with any "
        "latent of the large SAE, averaged):",
        "",
        markdown_table(["large SAE"] + refs,
                       ([LABELS.get(v, v)] + [f"{row[r]['mean']:.3f}" for r in refs] for v, row in corr.items())),
        "", "Every SAE on held-out tokens:", "",
        markdown_table(["SAE", "latents", "L0", "FVU", "dead latents", "train wall s"],
                       ([LABELS.get(n, n), _size(plan, n), f"{m['l0']:.1f}", f"{m['fvu']:.3f}",
                         f"{100 * m['dead_fraction']:.1f}%", f"{m['wall_s']:.0f}"] for n, m in metrics.items())),
    ]
    curves = {n: m["prefix_fvu"] for n, m in metrics.items() if "prefix_fvu" in m}
    if curves:
        widths = list(next(iter(curves.values())))
        lines += ["", "Nested-prefix FVU (decoding only the first m latents):", "",
                  markdown_table(["SAE"] + [f"m = {w}" for w in widths],
                                 ([LABELS.get(n, n)] + [f"{c[w]:.3f}" for w in widths] for n, c in curves.items()))]
    return "\n".join(lines) + "\n"


def plot(plan: Plan, corr: dict[str, dict[str, Any]], path: Path) -> None:
    """The post's figure: mean max correlation against reference size, one line per large SAE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matryoshka_plugin.io import atomic_open

    fig, ax = plt.subplots(figsize=(6, 4))
    refs = [f"ref_{s}" for s in plan.reference_sizes]
    for v, row in corr.items():
        ax.plot(plan.reference_sizes, [row[r]["mean"] for r in refs], marker="o", label=LABELS.get(v, v))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("reference SAE latents")
    ax.set_ylabel("mean max correlation")
    ax.set_title(f"{plan.large_size}-latent SAEs, L0 = {plan.k}, MiniLM block 3")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
