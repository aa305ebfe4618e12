"""One runner per eval, in the table :data:`RUNNERS`: hand one SAE to SAEBench, check what it
wrote and move it into place.

``absorption``, ``sparse_probing``, ``sparse_probing_sae_probes``, ``scr``, ``tpp`` and
``meta_structure`` run through SAEBench's own ``run_eval`` and ``core`` through
``sae_bench.evals.core.main.multiple_evals`` (core has no ``run_eval``). SAEBench
writes to a staging folder; the runner checks the JSON and renames it into place, so a result file
is either complete or absent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple

from .configs import EvalConfig
from .patches import (absorption_in, absorption_vocabulary, core_errors_logged, core_metrics, float32_probe_inputs,
                      forward_to_hook_layer, length_sorted_probe_texts)
from ..io import read_json
from .results import RESULT_SUFFIX, EvalRecord, add_letter_latents, publish_result, result_path, write_not_evaluated

log = logging.getLogger(__name__)


class EvalDirs(NamedTuple):
    """The folders one eval of one SAE uses."""

    output_dir: Path
    """Where results go (``<output_dir>/<eval>/...``)."""
    staging: Path
    """Where SAEBench writes before the result is checked and moved into place."""
    artifacts: Path
    """SAEBench's caches for this eval and config (``<artifacts_dir>/<eval>/<config hash>``)."""


Runner = Callable[[EvalConfig, str, Any, str, EvalDirs], EvalRecord]
"""``runner(cfg, name, sae, device, dirs)``: evaluate one SAELens ``SAE`` named ``name``."""


def _published(eval_name: str, name: str, dirs: EvalDirs, staged: Path) -> EvalRecord:
    final = result_path(dirs.output_dir, name, eval_name)
    publish_result(staged, final)
    return EvalRecord(name, eval_name, "done", str(final))


def run_core(cfg: EvalConfig, name: str, sae: Any, device: str, dirs: EvalDirs) -> EvalRecord:
    import sae_bench.evals.core.main as core

    with core_errors_logged() as errors, core_metrics(cfg.max_activation_norm):
        core.multiple_evals([(name, sae)], output_folder=str(dirs.staging / "core"), dtype=cfg.llm_dtype,
                            device=device, force_rerun=True, **cfg.saebench_dict())
    staged = dirs.staging / "core" / f"{name}{RESULT_SUFFIX}"
    if not staged.is_file():
        detail = "; ".join(errors) or "no error was logged"
        raise RuntimeError(f"SAEBench's core eval failed for {name}: {detail}")
    return _published("core", name, dirs, staged)


def run_absorption(cfg: EvalConfig, name: str, sae: Any, device: str, dirs: EvalDirs) -> EvalRecord:
    import sae_bench.evals.absorption.main as absorption_main

    out = dirs.staging / "absorption"
    out.mkdir(parents=True, exist_ok=True)  # absorption's run_eval does not create it
    with absorption_in(dirs.artifacts) as cwd, absorption_vocabulary(cfg.probe_vocab_size, cfg.random_seed), \
            forward_to_hook_layer():
        absorption_main.run_eval(cfg.saebench, [(name, sae)], device, str(out), force_rerun=True)
    staged = out / f"{name}{RESULT_SUFFIX}"
    summary = cwd / "artifacts" / "absorption" / f"{name}_custom_sae_k_sparse_probing.json"
    if staged.is_file():
        if summary.is_file():  # whether the SAE has first-letter latents at all (results.letter_latents)
            add_letter_latents(staged, summary)
        return _published("absorption", name, dirs, staged)
    # SAEBench returned {} without a word: too few first letters have a good ground-truth probe.
    per_letter: dict[str, float] = {}
    if summary.is_file():
        for row in read_json(summary):
            per_letter[str(row.get("letter"))] = float(row.get("f1_probe", float("nan")))
    good = sorted(k for k, v in per_letter.items() if v > cfg.min_GT_probe_f1)
    reason = (
        f"only {len(good)} first letters have a ground-truth probe with F1 > {cfg.min_GT_probe_f1} "
        f"(SAEBench needs min_feats_for_eval={cfg.min_feats_for_eval}); the model {cfg.model_name} does not "
        "represent first letters well enough at this layer, so SAEBench computes no absorption score"
    )
    path = write_not_evaluated(dirs.output_dir, name, reason, per_letter, good, cfg.to_dict())
    log.warning("absorption for %s: %s", name, reason)
    return EvalRecord(name, "absorption", "not_evaluated", str(path), reason=reason)


def run_probing(cfg: EvalConfig, name: str, sae: Any, device: str, dirs: EvalDirs) -> EvalRecord:
    """``sparse_probing``, ``scr`` or ``tpp`` (by ``cfg.eval_name``)."""
    if cfg.eval_name == "sparse_probing":
        import sae_bench.evals.sparse_probing.main as module

        out = dirs.staging / "sparse_probing"
    else:
        import sae_bench.evals.scr_and_tpp.main as module

        out = dirs.staging  # run_eval appends scr/ or tpp/
    module.run_eval(cfg.saebench, [(name, sae)], device, str(out), force_rerun=True, clean_up_activations=False,
                    save_activations=True, artifacts_path=str(dirs.artifacts))
    staged = dirs.staging / cfg.eval_name / f"{name}{RESULT_SUFFIX}"
    if not staged.is_file():
        raise RuntimeError(f"SAEBench's {cfg.eval_name} eval finished without writing {staged}")
    return _published(cfg.eval_name, name, dirs, staged)


def sae_probes_model_cache(artifacts: Path, cfg: EvalConfig) -> Path:
    """Where sae-probes keeps the model's activations: one folder per model and dtype beside the
    config-hash folders, so runs with other datasets, ks or seeds reuse them."""
    key = hashlib.sha256(f"{cfg.model_name}|{cfg.llm_dtype}".encode()).hexdigest()[:12]
    return artifacts.parent / f"model_activations_{key}"


def run_sae_probes(cfg: EvalConfig, name: str, sae: Any, device: str, dirs: EvalDirs) -> EvalRecord:
    """``sparse_probing_sae_probes``: sae-probes' results go to ``dirs.artifacts`` (its LLM baseline
    is shared by every SAE of the same config), the model's activations to
    :func:`sae_probes_model_cache`."""
    import sae_bench.evals.sparse_probing_sae_probes.main as module

    config = dataclasses.replace(cfg.saebench, results_path=str(dirs.artifacts),
                                 model_cache_path=str(sae_probes_model_cache(dirs.artifacts, cfg)))
    # sae-probes skips every dataset whose result JSON exists: drop this SAE's old ones (a retrained
    # SAE under the same name would otherwise be scored by its predecessor's probes).
    shutil.rmtree(dirs.artifacts / f"{name}_custom_sae", ignore_errors=True)
    out = dirs.staging / "sparse_probing_sae_probes"
    with float32_probe_inputs(), length_sorted_probe_texts():
        module.run_eval(config, [(name, sae)], device, str(out), force_rerun=True)
    staged = out / f"{name}{RESULT_SUFFIX}"
    if not staged.is_file():
        raise RuntimeError(f"SAEBench's sparse_probing_sae_probes eval finished without writing {staged}")
    return _published("sparse_probing_sae_probes", name, dirs, staged)


def run_meta_structure(cfg: EvalConfig, name: str, sae: Any, device: str, dirs: EvalDirs) -> EvalRecord:
    """``meta_structure``: a BatchTopK meta-SAE trained on the decoder rows (no language model)."""
    import sae_bench.evals.meta_structure.main as module

    out = dirs.staging / "meta_structure"
    module.run_eval(cfg.saebench, [(name, sae)], device, str(out), force_rerun=True)
    staged = out / f"{name}{RESULT_SUFFIX}"
    if not staged.is_file():
        raise RuntimeError(f"SAEBench's meta_structure eval finished without writing {staged}")
    return _published("meta_structure", name, dirs, staged)


RUNNERS: dict[str, Runner] = {
    "core": run_core,
    "absorption": run_absorption,
    "sparse_probing": run_probing,
    "scr": run_probing,
    "tpp": run_probing,
    "sparse_probing_sae_probes": run_sae_probes,
    "meta_structure": run_meta_structure,
}
