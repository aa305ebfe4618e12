"""Result files and records: where each outcome lives, reading it back, and the comparison rows.

Results are SAEBench's own JSON files in SAEBench's layout,
``<output_dir>/<eval>/<name>_custom_sae_eval_results.json``, plus
``<output_dir>/absorption/<name>_custom_sae_absorption_not_evaluated.json`` when SAEBench's
absorption eval computes no score (see :func:`write_not_evaluated`). With several seeds, the evals
that sample keep the same layout under ``<output_dir>/seed_<seed>/`` (:func:`seed_dir`).
"""

from __future__ import annotations

import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ..errors import SAEBenchError
from ..io import atomic_write_json, read_json
from .configs import EVAL_NAMES, SEEDED_EVALS

if TYPE_CHECKING:
    from .references import SAERef

RESULT_SUFFIX = "_custom_sae_eval_results.json"
NOT_EVALUATED_SUFFIX = "_custom_sae_absorption_not_evaluated.json"

# The columns of comparison tables: (column, eval, key in the flattened metrics). SCR/TPP use the
# top-20 ablation, sparse probing the top-1 latent, as in SAEBench's figures.
HEADLINE_METRICS: tuple[tuple[str, str, str], ...] = (
    ("l0", "core", "sparsity.l0"),
    ("explained_variance", "core", "reconstruction_quality.explained_variance"),
    ("mse", "core", "reconstruction_quality.mse"),
    ("ce_loss_score", "core", "model_performance_preservation.ce_loss_score"),
    ("kl_div_score", "core", "model_behavior_preservation.kl_div_score"),
    ("absorption", "absorption", "mean.mean_absorption_fraction_score"),
    ("full_absorption", "absorption", "mean.mean_full_absorption_score"),
    ("split_features", "absorption", "mean.mean_num_split_features"),
    # the adapter's addition (letter_latents): does the SAE have first-letter latents at all?
    ("letter_latent_f1", "absorption", "first_letter_latents.mean_f1"),
    ("sparse_probing_top1", "sparse_probing", "sae.sae_top_1_test_accuracy"),
    ("sparse_probing_llm", "sparse_probing", "llm.llm_test_accuracy"),
    ("sae_probes_top1", "sparse_probing_sae_probes", "sae.sae_top_1_test_accuracy"),
    ("sae_probes_llm", "sparse_probing_sae_probes", "llm.llm_test_accuracy"),
    ("scr_top20", "scr", "scr_metrics.scr_metric_threshold_20"),
    ("tpp_top20", "tpp", "tpp_metrics.tpp_threshold_20_total_metric"),
    ("meta_variance_explained", "meta_structure", "meta_structure.decoder_fraction_variance_explained"),
)


# One plain path component: no separators, no leading dot (so neither "." nor ".."), no
# whitespace or control characters. fullmatch, as "$" would let a trailing newline through.
_SAE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def check_sae_name(name: Any) -> str:
    """Return ``name`` if it can be used in result file and folder names; else raise
    :class:`SAEBenchError` naming it. Every path built from an SAE name goes through this."""
    if not isinstance(name, str) or not _SAE_NAME.fullmatch(name):
        raise SAEBenchError(
            f"SAE name {name!r} must start with a letter or digit and use only letters, digits and _ . + - "
            "(it becomes part of SAEBench's result file names, so no path separators, '..', spaces or "
            "control characters)"
        )
    return name


def result_path(output_dir: str | Path, name: str, eval_name: str) -> Path:
    """Where SAEBench's result JSON for SAE ``name`` and ``eval_name`` lives."""
    return Path(output_dir) / eval_name / f"{check_sae_name(name)}{RESULT_SUFFIX}"


def seed_dir(output_dir: str | Path, seed: int) -> Path:
    """Where the results of the seeded evals (:data:`SEEDED_EVALS`) for one seed live."""
    return Path(output_dir) / f"seed_{int(seed)}"


def not_evaluated_path(output_dir: str | Path, name: str) -> Path:
    """Where the record of an absorption eval without a score lives."""
    return Path(output_dir) / "absorption" / f"{check_sae_name(name)}{NOT_EVALUATED_SUFFIX}"


def outcome_paths(output_dir: str | Path, name: str, eval_name: str) -> list[Path]:
    """Every file that can hold the outcome of ``eval_name`` for SAE ``name``."""
    paths = [result_path(output_dir, name, eval_name)]
    if eval_name == "absorption":
        paths.append(not_evaluated_path(output_dir, name))
    return paths


def remove_results(output_dir: str | Path, name: str) -> list[Path]:
    """Delete every eval result of SAE ``name``, every seed's included (e.g. after retraining it);
    returns what was removed."""
    check_sae_name(name)
    removed = []
    folders = [Path(output_dir), *sorted(Path(output_dir).glob("seed_*"))]
    for folder in folders:
        for ev in EVAL_NAMES:
            for p in outcome_paths(folder, name, ev):
                if p.is_file():
                    p.unlink()
                    removed.append(p)
    return removed


def publish_result(staged: Path, final: Path) -> None:
    """Check the JSON SAEBench wrote to ``staged`` and move it to ``final`` atomically."""
    data = read_json(staged)
    if not isinstance(data, dict) or "eval_result_metrics" not in data:
        raise RuntimeError(f"SAEBench wrote {staged} without eval_result_metrics")
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, final)


def letter_latents(k_sparse_probing: Iterable[Mapping[str, Any]], letters: Iterable[str]) -> dict[str, Any]:
    """Per scored first letter, the latent SAEBench's absorption eval picks as the letter's main
    latent (its k = 1 sparse probe on the SAE's latents): its index, that probe's F1 and the cosine
    of its decoder row with the ground-truth probe; and the means over letters (``mean_f1``,
    ``mean_abs_decoder_cos``). The absorption score measures how often that latent misses words of
    its letter, so it presumes a first-letter latent exists: with ``mean_f1`` near 0 there is none,
    and a high absorption score says so rather than that one was absorbed.

    ``k_sparse_probing``: the rows of SAEBench's ``<sae>_k_sparse_probing.json``."""
    rows = {str(r["letter"]): r for r in k_sparse_probing}
    per = {}
    for letter in letters:
        r = rows.get(str(letter))
        if r is None:
            continue
        per[str(letter)] = {"latent": int(r["sparse_sae_k_1_feats"][0]), "f1": float(r["f1_sparse_sae_1"]),
                            "decoder_cos": float(r["cos_probe_sae_dec_k_1"][0])}
    if not per:
        return {"per_letter": {}, "mean_f1": None, "mean_abs_decoder_cos": None}
    return {"per_letter": per, "mean_f1": statistics.fmean(v["f1"] for v in per.values()),
            "mean_abs_decoder_cos": statistics.fmean(abs(v["decoder_cos"]) for v in per.values())}


def add_letter_latents(result: Path, k_sparse_probing: Path) -> dict[str, Any]:
    """Record :func:`letter_latents` (for the letters the result scores) in an absorption result
    file's ``eval_result_unstructured["first_letter_latents"]``, rewriting it atomically; returns it."""
    data = read_json(result)
    letters = [d["first_letter"] for d in data.get("eval_result_details") or []]
    found = letter_latents(read_json(k_sparse_probing), letters)
    extra = data.get("eval_result_unstructured")
    data["eval_result_unstructured"] = {**(extra if isinstance(extra, dict) else {}), "first_letter_latents": found}
    atomic_write_json(data, result)
    return found


def write_not_evaluated(output_dir: Path, name: str, reason: str, per_letter: Mapping[str, float],
                        good: list[str], eval_config: Mapping[str, Any]) -> Path:
    """Record (atomically) why SAEBench's absorption eval computed no score for SAE ``name``;
    ``per_letter`` is the ground-truth probe F1 of every first letter, ``good`` the letters that pass."""
    path = not_evaluated_path(output_dir, name)
    atomic_write_json({
        "status": "not_evaluated",
        "eval_type_id": "absorption_first_letter",
        "sae_name": name,
        "reason": reason,
        "letters_with_good_probe": good,
        "probe_f1_per_letter": dict(per_letter),
        "eval_config": dict(eval_config),
    }, path, default=str)
    return path


def flatten_metrics(eval_result_metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"sparsity": {"l0": 40}}`` -> ``{"sparsity.l0": 40.0}`` (numbers only)."""
    out: dict[str, float] = {}
    for key, value in eval_result_metrics.items():
        k = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, k + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
            out[k] = float(value)
    return out


def read_result(output_dir: str | Path, name: str, eval_name: str) -> dict | None:
    """``{"status", "metrics", "path"}`` for one SAE and eval, or None when it has not run.

    ``status`` is ``"done"`` (``metrics``: SAEBench's ``eval_result_metrics`` flattened) or
    ``"not_evaluated"`` (absorption without enough first-letter probes; ``metrics`` empty and
    ``reason`` set).
    """
    path = result_path(output_dir, name, eval_name)
    if path.is_file():
        data = read_json(path)
        metrics = flatten_metrics(data.get("eval_result_metrics") or {})
        extra = data.get("eval_result_unstructured")
        found = extra.get("first_letter_latents") if isinstance(extra, dict) else None
        if eval_name == "absorption" and isinstance(found, dict):
            metrics.update({f"first_letter_latents.{k}": found[k] for k in ("mean_f1", "mean_abs_decoder_cos")
                            if isinstance(found.get(k), (int, float))})
        return {"status": "done", "metrics": metrics, "path": str(path)}
    if eval_name == "absorption":
        ne = not_evaluated_path(output_dir, name)
        if ne.is_file():
            data = read_json(ne)
            return {"status": "not_evaluated", "metrics": {}, "path": str(ne), "reason": data.get("reason")}
    return None


def collect_results(output_dir: str | Path, names: Iterable[str] | None = None,
                    evals: Iterable[str] = EVAL_NAMES) -> dict[str, dict[str, dict]]:
    """``{sae name: {eval: read_result(...)}}`` for every result found under ``output_dir``."""
    output_dir = Path(output_dir)
    if names is None:
        found = set()
        for ev in evals:
            for suffix in (RESULT_SUFFIX, NOT_EVALUATED_SUFFIX):
                for p in (output_dir / ev).glob(f"*{suffix}"):
                    found.add(p.name[: -len(suffix)])
        names = sorted(found)
    out: dict[str, dict[str, dict]] = {}
    for name in names:
        out[name] = {ev: r for ev in evals if (r := read_result(output_dir, name, ev)) is not None}
    return out


def headline_row(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """The :data:`HEADLINE_METRICS` of one SAE from its ``collect_results`` entry (None where missing)."""
    row: dict[str, float | None] = {}
    for column, ev, key in HEADLINE_METRICS:
        r = results.get(ev)
        row[column] = None if r is None else r["metrics"].get(key)
    return row


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """``(mean, sample standard deviation, n)`` of the values that are not None; the standard
    deviation is None below two values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def seeded_headline(per_seed: Mapping[int, Mapping[str, Mapping[str, Any]]], evals: Iterable[str]) -> dict[str, Any]:
    """Mean, standard deviation and count over seeds of the seeded :data:`HEADLINE_METRICS` of one
    SAE (``per_seed``: ``{seed: {eval: read_result(...)}}``): columns ``c``, ``c_std``, ``c_n``."""
    evals = set(evals)
    row: dict[str, Any] = {}
    for column, ev, key in HEADLINE_METRICS:
        if ev not in SEEDED_EVALS or ev not in evals:
            continue
        got = []
        for res in per_seed.values():
            r = res.get(ev)
            got.append(None if r is None else r["metrics"].get(key))
        row[column], row[f"{column}_std"], row[f"{column}_n"] = mean_std(got)
    return row


@dataclass
class EvalRecord:
    """What one eval of one SAE did in a :func:`~matryoshka_plugin.saebench.run_saebench` call."""

    name: str
    """The SAE's name."""
    eval: str
    """The eval's name (one of ``EVAL_NAMES``)."""
    status: str
    """``"done"``, ``"skipped"`` (its result existed) or ``"not_evaluated"`` (absorption, too few
    first letters with a good probe)."""
    path: str
    """The result file (or the not-evaluated record)."""
    seconds: float = 0.0
    """Wall time of the eval; 0 when skipped."""
    metrics: dict[str, float] = field(default_factory=dict)
    """SAEBench's ``eval_result_metrics``, flattened (``"sparsity.l0"``); empty when not evaluated."""
    reason: str | None = None
    """Why absorption computed no score (status ``"not_evaluated"``)."""
    seed: int | None = None
    """The seed the eval ran with."""


@dataclass
class SAEBenchRun:
    """What :func:`~matryoshka_plugin.saebench.run_saebench` returns."""

    output_dir: Path
    """Where the results are."""
    model_name: str
    """The TransformerLens model the SAEs were evaluated on."""
    saes: list[SAERef]
    """The SAEs, as handed to SAEBench (trainer folders as their SAELens exports)."""
    evals: tuple[str, ...]
    """The evals asked for, in canonical order."""
    records: list[EvalRecord] = field(default_factory=list)
    """One per (SAE, eval, seed), in the order they ran or were skipped."""
    seeds: tuple[int, ...] | None = None
    """The seeds of the seeded evals (``run_saebench(seeds=...)``), or None for one run."""

    def results(self) -> dict[str, dict[str, dict]]:
        """:func:`collect_results` for this run's SAEs and evals (without ``seeds``: all of them;
        with: the evals that do not sample, e.g. core)."""
        return collect_results(self.output_dir, [r.name for r in self.saes], self.evals)

    def seed_results(self) -> dict[int, dict[str, dict[str, dict]]]:
        """``{seed: {sae name: {eval: read_result(...)}}}`` for the seeded evals; empty without ``seeds``."""
        evals = [e for e in self.evals if e in SEEDED_EVALS]
        names = [r.name for r in self.saes]
        return {s: collect_results(seed_dir(self.output_dir, s), names, evals) for s in self.seeds or ()}

    def rows(self) -> list[dict[str, Any]]:
        """One row per SAE: name, architecture, k, d_sae and the headline metrics. With ``seeds``,
        the seeded evals' columns hold the mean over seeds, with ``<column>_std`` (sample standard
        deviation, None below two seeds) and ``<column>_n`` (seeds with a value) beside them."""
        res = self.results()
        per_seed = self.seed_results()
        rows = []
        for r in self.saes:
            row = {"name": r.name, "architecture": r.architecture, "k": r.k, "d_sae": r.d_sae,
                   **headline_row(res.get(r.name, {}))}
            if self.seeds:
                row.update(seeded_headline({s: per_seed[s].get(r.name, {}) for s in self.seeds}, self.evals))
            rows.append(row)
        return rows
