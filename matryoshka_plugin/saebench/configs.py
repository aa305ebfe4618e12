"""Eval names and eval configs: one :class:`EvalConfig` type for every eval, core included.

SAEBench has a config dataclass for absorption, sparse probing and SCR/TPP, and none for core
(``sae_bench.evals.core.main.multiple_evals`` takes keyword arguments). :class:`EvalConfig` holds
either, so the run loop, the cache folders and the benchmark treat every eval alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..errors import SAEBenchError

EVAL_NAMES = ("core", "absorption", "sparse_probing", "sparse_probing_sae_probes", "scr", "tpp", "meta_structure")
MODEL_FREE_EVALS = frozenset({"meta_structure"})
"""Evals that need no language model (the meta-SAE trains on the decoder rows alone)."""
SEEDED_EVALS = ("absorption", "sparse_probing", "sparse_probing_sae_probes", "scr", "tpp", "meta_structure")
"""Evals whose result depends on the random seed (absorption's vocabulary split, the probing
train/test splits, the meta-SAE's initialisation and batches); ``run_saebench(seeds=...)`` repeats
these once per seed. Core reads the same text in the same order whatever the seed."""

# SAEBench's settings for its own custom-SAE runs of the core eval
# (sae_bench/custom_saes/run_all_evals_dictionary_learning_saes.py).
CORE_DEFAULTS: dict[str, Any] = {
    "n_eval_reconstruction_batches": 200,
    "n_eval_sparsity_variance_batches": 2000,
    "eval_batch_size_prompts": 16,
    "compute_featurewise_density_statistics": True,
    "compute_featurewise_weight_based_metrics": True,
    "exclude_special_tokens_from_reconstruction": True,
    "dataset": "Skylion007/openwebtext",
    "context_size": 128,
}

# eval -> (module, class) of SAEBench's config dataclass; core has none (see _core_parameters).
_CONFIG_CLASSES = {
    "absorption": ("sae_bench.evals.absorption.eval_config", "AbsorptionEvalConfig"),
    "sparse_probing": ("sae_bench.evals.sparse_probing.eval_config", "SparseProbingEvalConfig"),
    "scr": ("sae_bench.evals.scr_and_tpp.eval_config", "ScrAndTppEvalConfig"),
    "tpp": ("sae_bench.evals.scr_and_tpp.eval_config", "ScrAndTppEvalConfig"),
    "sparse_probing_sae_probes": ("sae_bench.evals.sparse_probing_sae_probes.eval_config",
                                  "SparseProbingSaeProbesEvalConfig"),
    "meta_structure": ("sae_bench.evals.meta_structure.eval_config", "MetaStructureEvalConfig"),
}
# Fields the run sets itself, per eval: sae-probes' results and model-activation folders go under
# the run's artifacts folder (SAEBench's defaults are relative to the working directory).
_RUN_SET_FIELDS = {"sparse_probing_sae_probes": ("results_path", "model_cache_path")}
# The only setting SAEBench aggregates sae-probes' results for (run_eval raises on the others).
_SAE_PROBES_SETTINGS = ("normal",)
# multiple_evals' arguments that the run sets itself (one SAE, staging folder, dtype, device).
_CORE_FIXED = {"selected_saes", "output_folder", "dtype", "device", "force_rerun"}

# What SAEBench caches per eval and which config fields it depends on. Absorption re-runs its
# per-SAE experiments on every call (force_rerun) and caches only the first-letter probes, which
# depend on the model (SAEBench keys them by name), the prompt, the dtype and the seed (the run
# seeds Python's random state, which draws the probes' train/test vocabulary split).
_ABSORPTION_CACHE_FIELDS = ("prompt_template", "prompt_token_pos", "llm_dtype", "model_name", "random_seed",
                            "probe_vocab_size")
# Settings the adapter adds to SAEBench's, per eval: name -> default (None keeps SAEBench's behaviour).
# absorption's probe_vocab_size: how many of the tokenizer's alphabetic tokens the first-letter probe
# and the absorption prompts draw on (SAEBench takes all of them, each in a prompt through the whole
# model, too many for a CPU: docs/causal_lm_comparison.md); see patches.absorption_vocabulary.
# core's max_activation_norm: tokens whose SAE input norm exceeds it (massive-activation attention
# sinks an SAE was not trained on) pass through the SAE unchanged and are left out of the variance;
# see patches.core_metrics.
ADAPTER_FIELDS: dict[str, dict[str, Any]] = {"absorption": {"probe_vocab_size": None},
                                             "core": {"max_activation_norm": None}}
# Fields that change nothing SAEBench caches for the probing evals (batch sizes, post-processing).
_UNCACHED_FIELDS = ("llm_batch_size", "sae_batch_size", "eval_batch_size_prompts", "n_values", "lower_vram_usage")


@dataclass(frozen=True)
class EvalConfig:
    """The settings of one SAEBench eval, with the fields SAEBench leaves unset filled in.

    Read a setting as ``cfg.field`` or ``cfg["field"]``; :meth:`to_dict` gives all of them.
    """

    eval_name: str
    """One of :data:`EVAL_NAMES`."""
    llm_dtype: str
    """The language model's dtype (core takes it as ``dtype=``, the other evals in ``saebench``)."""
    saebench: Any
    """What SAEBench takes: its config dataclass (``AbsorptionEvalConfig``, ...), or for core the
    keyword arguments of ``multiple_evals`` (a dict)."""
    adapter: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The adapter's own settings for this eval (:data:`ADAPTER_FIELDS`), not passed to SAEBench."""

    def saebench_dict(self) -> dict[str, Any]:
        """Every setting SAEBench gets, by name."""
        if isinstance(self.saebench, dict):
            return dict(self.saebench)
        return dataclasses.asdict(self.saebench)

    def to_dict(self) -> dict[str, Any]:
        """Every setting, by name: SAEBench's and the adapter's (:data:`ADAPTER_FIELDS`)."""
        return {**self.saebench_dict(), **self.adapter}

    def _names(self) -> set[str]:
        s = self.saebench
        return (set(s) if isinstance(s, dict) else {f.name for f in dataclasses.fields(s)}) | set(self.adapter)

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        if key in self.adapter:
            return self.adapter[key]
        s = self.saebench
        return s[key] if isinstance(s, dict) else getattr(s, key)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not fields of EvalConfig: SAEBench's settings.
        if name.startswith("__") or "saebench" not in self.__dict__:
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"the {self.eval_name} config has no setting {name!r}") from None

    def cache_key(self) -> str:
        """A hash of the settings SAEBench's caches for this eval depend on (the folder name of its
        artifacts, so changed settings never reuse stale activations or probes)."""
        d = self.to_dict()
        if self.eval_name == "absorption":
            d = {k: d[k] for k in _ABSORPTION_CACHE_FIELDS}
        else:
            d = {k: v for k, v in d.items()
                 if k not in _UNCACHED_FIELDS and k not in _RUN_SET_FIELDS.get(self.eval_name, ())}
            # sae-probes' configs have no llm_dtype field, but its cached activations depend on it
            d.setdefault("llm_dtype", self.llm_dtype)
        blob = json.dumps({"eval": self.eval_name, **d}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def check_eval_names(evals: Iterable[str] | str) -> tuple[str, ...]:
    """The eval names in canonical order; raises :class:`SAEBenchError` for unknown ones."""
    names = [evals] if isinstance(evals, str) else list(evals)
    unknown = [e for e in names if e not in EVAL_NAMES]
    if unknown:
        raise SAEBenchError(f"unknown eval name(s) {unknown}; known: {list(EVAL_NAMES)}")
    if not names:
        raise SAEBenchError(f"no evals selected; choose from {list(EVAL_NAMES)}")
    return tuple(e for e in EVAL_NAMES if e in names)


def default_llm_settings(model_name: str) -> tuple[int, str]:
    """SAEBench's batch size and dtype for known models (``gemma-2-2b``: 32, bfloat16), else 32, float32."""
    from sae_bench.sae_bench_utils.activation_collection import LLM_NAME_TO_BATCH_SIZE, LLM_NAME_TO_DTYPE

    return LLM_NAME_TO_BATCH_SIZE.get(model_name, 32), LLM_NAME_TO_DTYPE.get(model_name, "float32")


def _core_parameters() -> set[str]:
    from sae_bench.evals.core.main import multiple_evals

    return set(inspect.signature(multiple_evals).parameters) - _CORE_FIXED


def make_eval_config(
    eval_name: str,
    model_name: str,
    *,
    llm_batch_size: int,
    llm_dtype: str,
    random_seed: int = 42,
    overrides: Mapping[str, Any] | None = None,
) -> EvalConfig:
    """SAEBench's config for one eval with the fields SAEBench leaves unset filled in.

    ``model_name``, ``llm_batch_size``, ``llm_dtype`` and ``random_seed`` are set on every config;
    ``perform_scr`` distinguishes ``scr`` from ``tpp``. Core's settings are the keyword arguments of
    ``multiple_evals`` (defaults: SAEBench's own custom-SAE settings, :data:`CORE_DEFAULTS`).
    Unknown override fields raise :class:`SAEBenchError`.
    """
    overrides = dict(overrides or {})
    check_eval_names([eval_name])
    adapter = dict(ADAPTER_FIELDS.get(eval_name, {}))
    for key in adapter.keys() & overrides.keys():
        adapter[key] = overrides.pop(key)
    _check_adapter_fields(eval_name, adapter)
    if eval_name == "core":
        allowed = _core_parameters()
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise SAEBenchError(f"unknown core settings {unknown}; allowed: {sorted(allowed | set(adapter))}")
        return EvalConfig(eval_name, llm_dtype,
                          {**CORE_DEFAULTS, "eval_batch_size_prompts": llm_batch_size, **overrides}, adapter)
    module, class_name = _CONFIG_CLASSES[eval_name]
    cls = getattr(importlib.import_module(module), class_name)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        allowed = sorted(names | set(adapter))
        raise SAEBenchError(f"unknown {eval_name} config fields {unknown}; allowed: {allowed}")
    fixed = {"model_name", "llm_dtype"} & set(overrides)
    if fixed:
        raise SAEBenchError(f"{sorted(fixed)} are set by the run (model_name=, llm_dtype=), not per eval")
    run_set = set(_RUN_SET_FIELDS.get(eval_name, ())) & set(overrides)
    if run_set:
        raise SAEBenchError(f"{sorted(run_set)} are set by the run (under artifacts_dir), not per eval")
    run_kw = {"model_name": model_name, "llm_batch_size": llm_batch_size, "llm_dtype": llm_dtype,
              "random_seed": random_seed}
    kw: dict[str, Any] = {k: v for k, v in run_kw.items() if k in names}  # meta_structure has no model fields
    if eval_name in ("scr", "tpp"):
        if "perform_scr" in overrides:
            raise SAEBenchError("perform_scr is implied by the eval name (scr or tpp)")
        kw["perform_scr"] = eval_name == "scr"
    kw.update(overrides)
    if eval_name == "absorption" and int(kw.get("min_feats_for_eval", 20)) < 2:
        # SAEBench reports a standard deviation over letters
        raise SAEBenchError("absorption needs min_feats_for_eval >= 2")
    if eval_name == "sparse_probing_sae_probes":
        _check_sae_probes(kw)
    try:
        return EvalConfig(eval_name, llm_dtype, cls(**kw), adapter)
    except Exception as e:  # pydantic validation
        raise SAEBenchError(f"invalid {eval_name} config: {e}") from None


def _check_adapter_fields(eval_name: str, adapter: Mapping[str, Any]) -> None:
    norm = adapter.get("max_activation_norm")
    if norm is not None and (isinstance(norm, bool) or not isinstance(norm, (int, float)) or not norm > 0):
        raise SAEBenchError(f"{eval_name}: max_activation_norm must be None (no limit) or a positive number, got {norm!r}")
    size = adapter.get("probe_vocab_size")
    from .patches import MIN_WORDS_PER_LETTER

    least = 26 * MIN_WORDS_PER_LETTER  # the sample holds that many words of every first letter
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < least):
        raise SAEBenchError(f"{eval_name}: probe_vocab_size must be None (all) or an integer >= {least}, got {size!r}")


def _check_sae_probes(kw: Mapping[str, Any]) -> None:
    """What SAEBench's sae-probes wrapper would only find out after the model is loaded."""
    setting = kw.get("setting", "normal")
    if setting not in _SAE_PROBES_SETTINGS:
        raise SAEBenchError(f"sparse_probing_sae_probes: setting {setting!r} is not aggregated by SAEBench; "
                            f"use one of {list(_SAE_PROBES_SETTINGS)}")
    if kw.get("reg_type", "l1") not in ("l1", "l2"):
        raise SAEBenchError(f"sparse_probing_sae_probes: reg_type must be 'l1' or 'l2', got {kw['reg_type']!r}")
    if "dataset_names" in kw:
        from sae_probes import DATASETS

        names = list(kw["dataset_names"])
        unknown = [n for n in names if n not in DATASETS]
        if unknown or not names:
            raise SAEBenchError(f"sparse_probing_sae_probes: unknown dataset(s) {unknown or '(none given)'}; "
                                f"sae-probes ships {len(DATASETS)}, e.g. {DATASETS[:3]}")
    ks = list(kw.get("ks", [1]))
    if not ks or any(int(k) < 1 for k in ks):
        raise SAEBenchError(f"sparse_probing_sae_probes: ks must be positive, got {ks}")
