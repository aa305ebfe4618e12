"""SAEBench evals for this package's SAEs, dictionary_learning's, and any SAELens SAE.

    from matryoshka_plugin.saebench import run_saebench
    run = run_saebench(
        {"matryoshka_k40": "runs/x/trainer_0", "batchtopk_k40": "runs/x/trainer_1",
         "exported": "saelens/matryoshka-16k"},
        "eval_results", evals=["core", "absorption", "sparse_probing", "scr", "tpp"],
        device="cuda",
    )
    run.rows()          # one dict of headline metrics per SAE

What it hands SAEBench
======================
Every SAE is given to SAEBench as a stock SAELens ``SAE`` object, named by you:

* a ``trainer_i`` folder written by ``trainSAE`` (this package's trainers, or dictionary_learning's
  BatchTopK / TopK / standard / Matryoshka trainers) is exported once with
  :func:`matryoshka_plugin.export_to_saelens` into ``<output_dir>/saelens/<name>`` (re-exported
  only when ``ae.pt`` changes) and loaded with ``SAE.load_from_disk``;
* a SAELens folder (``cfg.json``) is loaded as is;
* ``("saelens", release, sae_id)`` or the string ``"saelens:RELEASE:SAE_ID"`` is a SAE from
  SAELens' pretrained directory (SAEBench's published suites), loaded with
  ``SAE.from_pretrained`` and ``fold_W_dec_norm()`` as SAEBench does for its own string ids;
* a SAELens ``SAE`` object is used as is.

The model name, hook, layer and widths come from the SAEs' own metadata, so they are checked
before anything is loaded: an unknown eval name, a missing folder, SAEs for another model or hook
than asked for, absorption on a non-residual hook, and unknown eval-config fields raise
:class:`SAEBenchError` before the language model is loaded.

How the evals run
=================
``absorption``, ``sparse_probing``, ``scr`` and ``tpp`` run through SAEBench's own
``run_eval`` (one SAE per call) and ``core`` through ``sae_bench.evals.core.main.multiple_evals``
(core has no ``run_eval``); results are SAEBench's JSON files, in SAEBench's layout:
``<output_dir>/<eval>/<name>_custom_sae_eval_results.json``. On top of that the adapter

* loads the language model **once** (with SAEBench's own call,
  ``HookedTransformer.from_pretrained_no_processing(model_name, device=, dtype=llm_dtype)``) or
  takes the one you pass as ``model=``, and makes every eval use it instead of loading its own;
* lets you serve SAEBench's data sets locally with ``load_dataset=`` (a replacement for
  ``datasets.load_dataset`` used by SAEBench's dataset readers and by the SAELens
  ``ActivationsStore`` that the core eval reads its text with);
* keeps every cache under ``<output_dir>/artifacts/<eval>/<config hash>`` (SAEBench's defaults are
  the current directory and its own installed package; keying by the eval config means changed
  settings never reuse stale cached activations or probes);
* writes each result atomically (SAEBench writes to a staging folder, the adapter checks the JSON
  and renames it into place), skips results that exist unless ``force=True`` so an interrupted run
  continues where it stopped, and raises instead of silently continuing when SAEBench's core eval
  swallows an exception;
* records absorption's silent no-result case: SAEBench's absorption returns ``{}`` and writes
  nothing when fewer than ``min_feats_for_eval`` first letters have a ground-truth probe with
  F1 > ``min_GT_probe_f1`` (always the case for small or random models). The adapter then writes
  ``<output_dir>/absorption/<name>_custom_sae_absorption_not_evaluated.json`` with the reason and
  the probe F1 of every letter, and reports status ``"not_evaluated"`` with no absorption metrics.
  That file counts as finished for resuming;
* restores torch's grad mode after each eval (SAEBench's SCR/TPP turn gradients off globally).

Model and dataset injection replace two module attributes of SAEBench (the model loader each eval
module calls, and its ``load_dataset``) for the duration of the call, and absorption runs with
the working directory set to its artifacts folder (it writes a relative ``artifacts/`` path).
Run one ``run_saebench`` at a time per process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from .checkpoints import atomic_write_json
from .errors import CheckpointError

__all__ = [
    "EVAL_NAMES",
    "HEADLINE_METRICS",
    "SAEBenchError",
    "SAERef",
    "EvalRecord",
    "SAEBenchRun",
    "describe_sae",
    "check_saes",
    "check_eval_names",
    "make_eval_config",
    "load_sae",
    "run_saebench",
    "result_path",
    "read_result",
    "collect_results",
    "remove_results",
    "flatten_metrics",
    "headline_row",
    "default_llm_settings",
    "prepare_sae",
]

EVAL_NAMES = ("core", "absorption", "sparse_probing", "scr", "tpp")

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
    ("sparse_probing_top1", "sparse_probing", "sae.sae_top_1_test_accuracy"),
    ("sparse_probing_llm", "sparse_probing", "llm.llm_test_accuracy"),
    ("scr_top20", "scr", "scr_metrics.scr_metric_threshold_20"),
    ("tpp_top20", "tpp", "tpp_metrics.tpp_threshold_20_total_metric"),
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_RELEASE_SPEC = "saelens:"
_RESULT_SUFFIX = "_custom_sae_eval_results.json"
_NOT_EVALUATED_SUFFIX = "_custom_sae_absorption_not_evaluated.json"
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_[A-Za-z_]+$")

log = logging.getLogger(__name__)


class SAEBenchError(ValueError):
    """Bad input for an SAEBench run, reported before any expensive work."""


# ----------------------------------------------------------------------------------------------
# Describing SAEs (metadata only, no weights)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SAERef:
    """What an SAE is, read from its metadata without loading weights."""

    name: str
    kind: str  # "trainer_folder" | "saelens_folder" | "saelens_release" | "object"
    source: Any  # a Path, (release, sae_id) or an SAE object
    model_name: str | None
    hook_name: str | None
    hook_layer: int | None
    d_in: int | None
    d_sae: int | None
    architecture: str | None = None  # training architecture (matryoshka_batchtopk, batchtopk, ...)
    k: int | None = None

    def describe(self) -> str:
        where = f"{self.source[0]}/{self.source[1]}" if self.kind == "saelens_release" else str(self.source)
        if self.kind == "object":
            where = type(self.source).__name__
        return f"{self.name} ({self.kind} {where}: model {self.model_name}, hook {self.hook_name})"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise SAEBenchError(
            f"SAE name {name!r} must start with a letter or digit and use only letters, digits and _ . + - "
            "(it becomes part of SAEBench's result file names)"
        )
    return name


def _layer_of(hook_name: str | None) -> int | None:
    if hook_name is None:
        return None
    m = re.search(r"\d+", hook_name)  # what SAEBench's _standardize_sae_cfg does
    return int(m.group(0)) if m else None


def _parse_release_spec(source: Any) -> tuple[str, str] | None:
    if isinstance(source, tuple) and len(source) == 3 and source[0] == "saelens":
        return str(source[1]), str(source[2])
    if isinstance(source, str) and source.startswith(_RELEASE_SPEC):
        rest = source[len(_RELEASE_SPEC) :]
        release, sep, sae_id = rest.partition(":")
        if not sep or not release or not sae_id:
            raise SAEBenchError(f"expected 'saelens:RELEASE:SAE_ID', got {source!r}")
        return release, sae_id
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON (truncated or corrupt?): {e}") from None


def describe_sae(source: Any, name: str | None = None) -> SAERef:
    """Read what an SAE is (model, hook, widths) from its metadata; loads no weights.

    ``source``: a ``trainer_i`` folder, a SAELens folder, ``("saelens", release, sae_id)`` /
    ``"saelens:RELEASE:SAE_ID"``, or a SAELens ``SAE`` object. Raises :class:`SAEBenchError` or
    :class:`~matryoshka_plugin.CheckpointError` (missing folders, unreadable configs).
    """
    from .hook_names import tl_hook_name, tl_model_name

    release = _parse_release_spec(source)
    if release is not None:
        rel, sae_id = release
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        directory = get_pretrained_saes_directory()
        if rel not in directory:
            raise SAEBenchError(f"SAELens has no pretrained release {rel!r} (see sae_lens' pretrained_saes.yaml)")
        entry = directory[rel]
        if sae_id not in entry.saes_map:
            examples = sorted(entry.saes_map)[:5]
            raise SAEBenchError(f"release {rel!r} has no SAE {sae_id!r}; e.g. {examples}")
        hook = sae_id.split("__")[0]
        hook = hook if _HOOK.match(hook) else None
        return SAERef(
            name=_check_name(name or f"{rel}__{sae_id}".replace("/", "_")),
            kind="saelens_release",
            source=(rel, sae_id),
            model_name=entry.model,
            hook_name=hook,
            hook_layer=_layer_of(hook),
            d_in=None,
            d_sae=None,
        )
    if isinstance(source, torch.nn.Module):
        cfg = getattr(source, "cfg", None)
        if cfg is None or not hasattr(cfg, "d_sae"):
            raise SAEBenchError(
                f"{type(source).__name__} is not a SAELens SAE; pass its trainer folder, or export it with "
                "matryoshka_plugin.export_to_saelens"
            )
        meta = getattr(cfg, "metadata", None)
        hook = getattr(meta, "hook_name", None) or getattr(cfg, "hook_name", None)
        return SAERef(
            name=_check_name(name or "sae"),
            kind="object",
            source=source,
            model_name=getattr(meta, "model_name", None) or getattr(cfg, "model_name", None),
            hook_name=hook,
            hook_layer=getattr(meta, "hook_layer", None) or _layer_of(hook),
            d_in=int(cfg.d_in),
            d_sae=int(cfg.d_sae),
            architecture=getattr(meta, "training_architecture", None),
        )
    if not isinstance(source, (str, os.PathLike)):
        raise SAEBenchError(f"cannot use {type(source).__name__} as an SAE; give a folder, a SAELens release or SAE")
    folder = Path(source)
    if not folder.is_dir():
        raise SAEBenchError(f"no such SAE folder: {folder}")
    name = _check_name(name or folder.name)
    if (folder / "cfg.json").is_file():
        cfg = _read_json(folder / "cfg.json")
        meta = cfg.get("metadata") or {}
        hook = meta.get("hook_name", cfg.get("hook_name"))
        if not (folder / "sae_weights.safetensors").is_file():
            raise CheckpointError(f"SAELens folder {folder} has cfg.json but no sae_weights.safetensors")
        return SAERef(
            name=name,
            kind="saelens_folder",
            source=folder,
            model_name=meta.get("model_name", cfg.get("model_name")),
            hook_name=hook,
            hook_layer=meta.get("hook_layer") if meta.get("hook_layer") is not None else _layer_of(hook),
            d_in=cfg.get("d_in"),
            d_sae=cfg.get("d_sae"),
            architecture=meta.get("training_architecture", cfg.get("architecture")),
            k=meta.get("k", cfg.get("k")),
        )
    if (folder / "config.json").is_file():
        from .checkpoints import read_config

        config = read_config(folder)
        if not (folder / "ae.pt").is_file():
            raise CheckpointError(f"{folder} has no ae.pt: its training did not finish")
        tr = config["trainer"]
        buf = config.get("buffer") or {}
        try:
            hook = tl_hook_name(tr.get("submodule_name"), buf.get("io", "out"), tr.get("layer"), tr.get("lm_name"))
        except ValueError as e:
            raise SAEBenchError(f"{folder}: {e}") from None
        return SAERef(
            name=name,
            kind="trainer_folder",
            source=folder,
            model_name=tl_model_name(tr.get("lm_name")),
            hook_name=hook,
            hook_layer=_layer_of(hook),
            d_in=tr.get("activation_dim"),
            d_sae=tr.get("dict_size"),
            architecture=_training_architecture(tr),
            k=tr.get("k"),
        )
    raise SAEBenchError(f"{folder} is neither a trainSAE folder (config.json + ae.pt) nor a SAELens folder (cfg.json)")


def _training_architecture(trainer_cfg: Mapping[str, Any]) -> str:
    dict_class = str(trainer_cfg.get("dict_class", ""))
    return {
        "MatryoshkaBatchTopKSAE": "matryoshka_batchtopk",
        "MatryoshkaLogSparsitySAE": "matryoshka_log_sparsity",
        "BatchTopKSAE": "batchtopk",
        "AutoEncoderTopK": "topk",
        "AutoEncoder": "standard",
    }.get(dict_class, dict_class or "unknown")


def _as_named(saes: Any) -> list[tuple[str | None, Any]]:
    if isinstance(saes, Mapping):
        return list(saes.items())
    if isinstance(saes, (str, os.PathLike, torch.nn.Module)) or _is_release_tuple(saes):
        return [(None, saes)]
    out: list[tuple[str | None, Any]] = []
    for item in saes:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and not _is_release_tuple(item):
            out.append(item)
        else:
            out.append((None, item))
    return out


def _is_release_tuple(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 3 and x[0] == "saelens"


def check_eval_names(evals: Iterable[str] | str) -> tuple[str, ...]:
    """The eval names in canonical order; raises :class:`SAEBenchError` for unknown ones."""
    names = [evals] if isinstance(evals, str) else list(evals)
    unknown = [e for e in names if e not in EVAL_NAMES]
    if unknown:
        raise SAEBenchError(f"unknown eval name(s) {unknown}; known: {list(EVAL_NAMES)}")
    if not names:
        raise SAEBenchError(f"no evals selected; choose from {list(EVAL_NAMES)}")
    return tuple(e for e in EVAL_NAMES if e in names)


def check_saes(
    refs: Sequence[SAERef],
    *,
    model_name: str | None = None,
    hook_name: str | None = None,
    evals: Iterable[str] = (),
) -> str:
    """Check that the SAEs fit one run; returns the model name.

    Every SAE must name the same model (``model_name`` when given), and ``hook_name`` when given;
    absorption needs residual-stream SAEs (``blocks.N.hook_resid_post``), the only hook its
    first-letter probes are trained on.
    """
    if not refs:
        raise SAEBenchError("no SAEs given")
    seen: dict[str, SAERef] = {}
    for ref in refs:
        if ref.name in seen:
            raise SAEBenchError(f"two SAEs are named {ref.name!r}: {seen[ref.name].describe()} and {ref.describe()}")
        seen[ref.name] = ref
    for ref in refs:
        if ref.model_name is None:
            raise SAEBenchError(f"{ref.describe()} does not record its model name")
        if ref.hook_name is None and ref.kind != "saelens_release":
            raise SAEBenchError(f"{ref.describe()} does not record its hook name")
    if model_name is not None:
        bad = [r for r in refs if r.model_name != model_name]
        if bad:
            raise SAEBenchError(
                f"model mismatch: the config asks for {model_name!r} but "
                + "; ".join(r.describe() for r in bad)
            )
    else:
        models = sorted({r.model_name for r in refs})  # type: ignore[type-var]
        if len(models) > 1:
            raise SAEBenchError(f"the SAEs are for different models {models}; run them separately")
        model_name = models[0]
    if hook_name is not None:
        bad = [r for r in refs if r.hook_name is not None and r.hook_name != hook_name]
        if bad:
            raise SAEBenchError(
                f"hook mismatch: the config asks for {hook_name!r} but " + "; ".join(r.describe() for r in bad)
            )
    if "absorption" in set(evals):
        bad = [r for r in refs if r.hook_name is not None and not re.match(r"^blocks\.\d+\.hook_resid_post$", r.hook_name)]
        if bad:
            raise SAEBenchError(
                "absorption trains its first-letter probes on blocks.N.hook_resid_post only; not on "
                + "; ".join(r.describe() for r in bad)
            )
    return str(model_name)


# ----------------------------------------------------------------------------------------------
# Eval configs
# ----------------------------------------------------------------------------------------------


def _config_class(eval_name: str):
    if eval_name == "absorption":
        from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig

        return AbsorptionEvalConfig
    if eval_name == "sparse_probing":
        from sae_bench.evals.sparse_probing.eval_config import SparseProbingEvalConfig

        return SparseProbingEvalConfig
    if eval_name in ("scr", "tpp"):
        from sae_bench.evals.scr_and_tpp.eval_config import ScrAndTppEvalConfig

        return ScrAndTppEvalConfig
    raise SAEBenchError(f"no SAEBench config class for {eval_name!r}")


def _core_parameters() -> set[str]:
    from sae_bench.evals.core.main import multiple_evals

    fixed = {"selected_saes", "output_folder", "dtype", "device", "force_rerun"}
    return set(inspect.signature(multiple_evals).parameters) - fixed


def default_llm_settings(model_name: str) -> tuple[int, str]:
    """SAEBench's batch size and dtype for known models (``gemma-2-2b``: 32, bfloat16), else 32, float32."""
    from sae_bench.sae_bench_utils.activation_collection import LLM_NAME_TO_BATCH_SIZE, LLM_NAME_TO_DTYPE

    return LLM_NAME_TO_BATCH_SIZE.get(model_name, 32), LLM_NAME_TO_DTYPE.get(model_name, "float32")


def make_eval_config(
    eval_name: str,
    model_name: str,
    *,
    llm_batch_size: int,
    llm_dtype: str,
    random_seed: int = 42,
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """SAEBench's config for one eval with the fields SAEBench leaves unset filled in.

    ``model_name``, ``llm_batch_size``, ``llm_dtype`` and ``random_seed`` are set on every config;
    ``perform_scr`` distinguishes ``scr`` from ``tpp``. ``core`` returns a dict of keyword arguments
    for ``multiple_evals`` (defaults: SAEBench's own custom-SAE settings, :data:`CORE_DEFAULTS`).
    Unknown override fields raise :class:`SAEBenchError`.
    """
    overrides = dict(overrides or {})
    if eval_name not in EVAL_NAMES:
        check_eval_names([eval_name])
    if eval_name == "core":
        allowed = _core_parameters()
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise SAEBenchError(f"unknown core settings {unknown}; allowed: {sorted(allowed)}")
        kw = {**CORE_DEFAULTS, "eval_batch_size_prompts": llm_batch_size, **overrides}
        return kw
    cls = _config_class(eval_name)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise SAEBenchError(f"unknown {eval_name} config fields {unknown}; allowed: {sorted(names)}")
    fixed = {"model_name", "llm_dtype"} & set(overrides)
    if fixed:
        raise SAEBenchError(f"{sorted(fixed)} are set by the run (model_name=, llm_dtype=), not per eval")
    kw: dict[str, Any] = {"model_name": model_name, "llm_batch_size": llm_batch_size, "llm_dtype": llm_dtype,
                          "random_seed": random_seed}
    if eval_name in ("scr", "tpp"):
        if "perform_scr" in overrides:
            raise SAEBenchError("perform_scr is implied by the eval name (scr or tpp)")
        kw["perform_scr"] = eval_name == "scr"
    kw.update(overrides)
    if eval_name == "absorption" and int(kw.get("min_feats_for_eval", 20)) < 2:
        # SAEBench reports a standard deviation over letters
        raise SAEBenchError("absorption needs min_feats_for_eval >= 2")
    try:
        return cls(**kw)
    except Exception as e:  # pydantic validation
        raise SAEBenchError(f"invalid {eval_name} config: {e}") from None


def _config_dict(cfg: Any) -> dict:
    return dict(cfg) if isinstance(cfg, dict) else dataclasses.asdict(cfg)


# What SAEBench caches per eval and which config fields it depends on. Absorption re-runs its
# per-SAE experiments on every call (force_rerun) and caches only the first-letter probes, which
# depend on the model (SAEBench keys them by name), the prompt and the dtype.
_ABSORPTION_CACHE_FIELDS = ("prompt_template", "prompt_token_pos", "llm_dtype", "model_name")
# Fields that change nothing SAEBench caches for the probing evals (batch sizes, post-processing).
_UNCACHED_FIELDS = ("llm_batch_size", "sae_batch_size", "eval_batch_size_prompts", "n_values", "lower_vram_usage")


def _config_hash(eval_name: str, cfg: Any) -> str:
    d = _config_dict(cfg)
    if eval_name == "absorption":
        d = {k: d[k] for k in _ABSORPTION_CACHE_FIELDS}
    else:
        d = {k: v for k, v in d.items() if k not in _UNCACHED_FIELDS}
    blob = json.dumps({"eval": eval_name, **d}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# Loading SAEs
# ----------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_sae(ref: SAERef, cache_dir: str | Path) -> SAERef:
    """Export a ``trainer_i`` folder to ``cache_dir/<name>`` (skipped when the export there is of
    the same ``ae.pt``); returns a ref to the SAELens folder. Other refs are returned unchanged."""
    if ref.kind != "trainer_folder":
        return ref
    from .saelens import export_to_saelens

    src = Path(ref.source)
    out = Path(cache_dir) / ref.name
    digest = _sha256(src / "ae.pt")
    cfg_path = out / "cfg.json"
    if cfg_path.is_file():
        try:
            meta = json.loads(cfg_path.read_text()).get("metadata") or {}
        except (OSError, json.JSONDecodeError):
            meta = {}
        if meta.get("source_sha256") == digest:
            return dataclasses.replace(describe_sae(out, ref.name), architecture=ref.architecture, k=ref.k)
    export_to_saelens(src, out, extra_metadata={"source_folder": str(src.resolve()), "source_sha256": digest},
                      overwrite=True)
    return dataclasses.replace(describe_sae(out, ref.name), architecture=ref.architecture, k=ref.k)


def load_sae(ref: SAERef | Any, device: str = "cpu", cache_dir: str | Path | None = None):
    """A SAELens ``SAE`` for any accepted source (see :func:`describe_sae`)."""
    from sae_lens import SAE

    if not isinstance(ref, SAERef):
        ref = describe_sae(ref)
    if ref.kind == "trainer_folder":
        if cache_dir is None:
            raise SAEBenchError("loading a trainer folder for SAEBench needs cache_dir= (where to export it)")
        ref = prepare_sae(ref, cache_dir)
    if ref.kind == "saelens_folder":
        return SAE.load_from_disk(str(ref.source), device=device)
    if ref.kind == "saelens_release":
        sae = SAE.from_pretrained(ref.source[0], ref.source[1], device=device)
        with contextlib.suppress(NotImplementedError):
            sae.fold_W_dec_norm()
        return sae
    return ref.source.to(device)


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


def result_path(output_dir: str | Path, name: str, eval_name: str) -> Path:
    """Where SAEBench's result JSON for SAE ``name`` and ``eval_name`` lives."""
    return Path(output_dir) / eval_name / f"{name}{_RESULT_SUFFIX}"


def _not_evaluated_path(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / "absorption" / f"{name}{_NOT_EVALUATED_SUFFIX}"


def remove_results(output_dir: str | Path, name: str) -> list[Path]:
    """Delete every eval result of SAE ``name`` (e.g. after retraining it); returns what was removed."""
    removed = []
    for ev in EVAL_NAMES:
        for p in (result_path(output_dir, name, ev), _not_evaluated_path(output_dir, name)):
            if p.is_file():
                p.unlink()
                removed.append(p)
    return removed


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
        data = _read_json(path)
        return {"status": "done", "metrics": flatten_metrics(data.get("eval_result_metrics") or {}), "path": str(path)}
    if eval_name == "absorption":
        ne = _not_evaluated_path(output_dir, name)
        if ne.is_file():
            data = _read_json(ne)
            return {"status": "not_evaluated", "metrics": {}, "path": str(ne), "reason": data.get("reason")}
    return None


def collect_results(output_dir: str | Path, names: Iterable[str] | None = None,
                    evals: Iterable[str] = EVAL_NAMES) -> dict[str, dict[str, dict]]:
    """``{sae name: {eval: read_result(...)}}`` for every result found under ``output_dir``."""
    output_dir = Path(output_dir)
    if names is None:
        found = set()
        for ev in evals:
            for p in (output_dir / ev).glob(f"*{_RESULT_SUFFIX}"):
                found.add(p.name[: -len(_RESULT_SUFFIX)])
            for p in (output_dir / ev).glob(f"*{_NOT_EVALUATED_SUFFIX}"):
                found.add(p.name[: -len(_NOT_EVALUATED_SUFFIX)])
        names = sorted(found)
    out: dict[str, dict[str, dict]] = {}
    for name in names:
        per = {ev: r for ev in evals if (r := read_result(output_dir, name, ev)) is not None}
        out[name] = per
    return out


def headline_row(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """The :data:`HEADLINE_METRICS` of one SAE from its ``collect_results`` entry (None where missing)."""
    row: dict[str, float | None] = {}
    for column, ev, key in HEADLINE_METRICS:
        r = results.get(ev)
        row[column] = None if r is None else r["metrics"].get(key)
    return row


@dataclass
class EvalRecord:
    name: str
    eval: str
    status: str  # "done" | "skipped" (result existed) | "not_evaluated" (absorption, too few letters)
    path: str
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None


@dataclass
class SAEBenchRun:
    output_dir: Path
    model_name: str
    saes: list[SAERef]
    evals: tuple[str, ...]
    records: list[EvalRecord] = field(default_factory=list)

    def results(self) -> dict[str, dict[str, dict]]:
        return collect_results(self.output_dir, [r.name for r in self.saes], self.evals)

    def rows(self) -> list[dict[str, Any]]:
        """One row per SAE: name, architecture, k, d_sae and the headline metrics."""
        res = self.results()
        return [{"name": r.name, "architecture": r.architecture, "k": r.k, "d_sae": r.d_sae,
                 **headline_row(res.get(r.name, {}))} for r in self.saes]


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


class _ProvidedModel:
    """Stands in for ``HookedTransformer`` inside SAEBench's eval modules: ``from_pretrained_no_processing``
    returns the model this run already holds instead of loading one."""

    def __init__(self, model: Any, model_name: str):
        self.model = model
        self.model_name = model_name

    def from_pretrained_no_processing(self, model_name: str, *args: Any, **kwargs: Any) -> Any:
        if model_name != self.model_name:
            raise SAEBenchError(f"SAEBench asked for model {model_name!r} but this run evaluates {self.model_name!r}")
        dtype = kwargs.get("dtype")
        if dtype is not None and dtype != self.model.cfg.dtype:
            raise SAEBenchError(f"SAEBench asked for {model_name} in {dtype}, the run holds it in {self.model.cfg.dtype}")
        return self.model

    from_pretrained = from_pretrained_no_processing


_EVAL_MODULES = (
    "sae_bench.evals.absorption.main",
    "sae_bench.evals.sparse_probing.main",
    "sae_bench.evals.scr_and_tpp.main",
    "sae_bench.evals.core.main",
)
_DATASET_MODULES = (
    "sae_bench.sae_bench_utils.dataset_utils",
    "sae_bench.evals.scr_and_tpp.dataset_creation",
    "sae_lens.training.activations_store",
)


@contextlib.contextmanager
def _replaced(module: Any, attr: str, value: Any) -> Iterator[None]:
    old = getattr(module, attr)
    setattr(module, attr, value)
    try:
        yield
    finally:
        setattr(module, attr, old)


@contextlib.contextmanager
def _injected(model: Any, model_name: str, load_dataset: Callable | None) -> Iterator[None]:
    import importlib

    with contextlib.ExitStack() as stack:
        provided = _ProvidedModel(model, model_name)
        for mod_name in _EVAL_MODULES:
            stack.enter_context(_replaced(importlib.import_module(mod_name), "HookedTransformer", provided))
        if load_dataset is not None:
            for mod_name in _DATASET_MODULES:
                stack.enter_context(_replaced(importlib.import_module(mod_name), "load_dataset", load_dataset))
        yield


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    old = os.getcwd()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _grad_mode_restored() -> Iterator[None]:
    was = torch.is_grad_enabled()
    try:
        yield
    finally:
        torch.set_grad_enabled(was)


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _publish_result(staged: Path, final: Path) -> None:
    """Check SAEBench's JSON and move it into place atomically."""
    data = _read_json(staged)
    if not isinstance(data, dict) or "eval_result_metrics" not in data:
        raise RuntimeError(f"SAEBench wrote {staged} without eval_result_metrics")
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, final)


def _run_absorption(cfg: Any, name: str, sae: Any, device: str, staging: Path, artifacts: Path,
                    output_dir: Path) -> EvalRecord:
    import sae_bench.evals.absorption.main as absorption_main
    from sae_bench.evals.absorption.feature_absorption import run_feature_absortion_experiment
    from sae_bench.evals.absorption.k_sparse_probing import run_k_sparse_probing_experiment

    dirs = {"experiment_dir": artifacts / "k_sparse_probing", "probes_dir": artifacts / "probes"}
    k_sparse = functools.partial(run_k_sparse_probing_experiment, **dirs)
    feature = functools.partial(
        run_feature_absortion_experiment,
        experiment_dir=artifacts / "feature_absorption",
        sparse_probing_experiment_dir=dirs["experiment_dir"],
        probes_dir=dirs["probes_dir"],
    )
    out = staging / "absorption"
    out.mkdir(parents=True, exist_ok=True)  # absorption's run_eval does not create it
    with contextlib.ExitStack() as stack:
        stack.enter_context(_replaced(absorption_main, "run_k_sparse_probing_experiment", k_sparse))
        stack.enter_context(_replaced(absorption_main, "run_feature_absortion_experiment", feature))
        # run_eval writes its k-sparse-probing summary to the relative path artifacts/absorption/
        stack.enter_context(_working_directory(artifacts / "cwd"))
        absorption_main.run_eval(cfg, [(name, sae)], device, str(out), force_rerun=True)
    staged = out / f"{name}{_RESULT_SUFFIX}"
    final = result_path(output_dir, name, "absorption")
    if staged.is_file():
        _publish_result(staged, final)
        return EvalRecord(name, "absorption", "done", str(final))
    # SAEBench returned {} without a word: too few first letters have a good ground-truth probe.
    summary = artifacts / "cwd" / "artifacts" / "absorption" / f"{name}_custom_sae_k_sparse_probing.json"
    per_letter: dict[str, float] = {}
    if summary.is_file():
        for row in _read_json(summary):
            per_letter[str(row.get("letter"))] = float(row.get("f1_probe", float("nan")))
    good = sorted(k for k, v in per_letter.items() if v > cfg.min_GT_probe_f1)
    reason = (
        f"only {len(good)} first letters have a ground-truth probe with F1 > {cfg.min_GT_probe_f1} "
        f"(SAEBench needs min_feats_for_eval={cfg.min_feats_for_eval}); the model {cfg.model_name} does not "
        "represent first letters well enough at this layer, so SAEBench computes no absorption score"
    )
    ne = _not_evaluated_path(output_dir, name)
    atomic_write_json({
        "status": "not_evaluated",
        "eval_type_id": "absorption_first_letter",
        "sae_name": name,
        "reason": reason,
        "letters_with_good_probe": good,
        "probe_f1_per_letter": per_letter,
        "eval_config": dataclasses.asdict(cfg),
    }, ne, default=str)
    log.warning("absorption for %s: %s", name, reason)
    return EvalRecord(name, "absorption", "not_evaluated", str(ne), reason=reason)


def _run_probing(eval_name: str, cfg: Any, name: str, sae: Any, device: str, staging: Path, artifacts: Path,
                 output_dir: Path) -> EvalRecord:
    if eval_name == "sparse_probing":
        import sae_bench.evals.sparse_probing.main as module

        out = staging / "sparse_probing"
    else:
        import sae_bench.evals.scr_and_tpp.main as module

        out = staging  # run_eval appends scr/ or tpp/
    module.run_eval(cfg, [(name, sae)], device, str(out), force_rerun=True, clean_up_activations=False,
                    save_activations=True, artifacts_path=str(artifacts))
    staged = staging / eval_name / f"{name}{_RESULT_SUFFIX}"
    if not staged.is_file():
        raise RuntimeError(f"SAEBench's {eval_name} eval finished without writing {staged}")
    final = result_path(output_dir, name, eval_name)
    _publish_result(staged, final)
    return EvalRecord(name, eval_name, "done", str(final))


def _run_core(kw: Mapping[str, Any], name: str, sae: Any, device: str, llm_dtype: str, staging: Path,
              output_dir: Path) -> EvalRecord:
    import sae_bench.evals.core.main as core

    capture = _LogCapture()
    core.logger.addHandler(capture)
    try:
        core.multiple_evals([(name, sae)], output_folder=str(staging / "core"), dtype=llm_dtype, device=device,
                            force_rerun=True, **kw)
    finally:
        core.logger.removeHandler(capture)
    staged = staging / "core" / f"{name}{_RESULT_SUFFIX}"
    if not staged.is_file():
        detail = "; ".join(capture.messages) or "no error was logged"
        raise RuntimeError(f"SAEBench's core eval failed for {name}: {detail}")
    final = result_path(output_dir, name, "core")
    _publish_result(staged, final)
    return EvalRecord(name, "core", "done", str(final))


def _seed_everything(seed: int) -> None:
    # Absorption splits its vocabulary with Python's global random state and never seeds it.
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_model(model_name: str, device: str, llm_dtype: str) -> Any:
    from sae_bench.sae_bench_utils.general_utils import str_to_dtype
    from transformer_lens import HookedTransformer

    return HookedTransformer.from_pretrained_no_processing(model_name, device=device, dtype=str_to_dtype(llm_dtype))


def _check_model(model: Any, model_name: str, refs: Sequence[SAERef], llm_dtype: str) -> None:
    from sae_bench.sae_bench_utils.general_utils import str_to_dtype

    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "run_with_hooks"):
        raise SAEBenchError(f"model= must be a TransformerLens HookedTransformer, got {type(model).__name__}")
    if cfg.model_name != model_name:
        raise SAEBenchError(f"model= is {cfg.model_name!r} but the SAEs were trained on {model_name!r}")
    if cfg.dtype != str_to_dtype(llm_dtype):
        raise SAEBenchError(f"model= is in {cfg.dtype} but llm_dtype={llm_dtype!r}")
    if getattr(model, "tokenizer", None) is None:
        raise SAEBenchError("model= has no tokenizer; SAEBench tokenizes with model.tokenizer")
    for r in refs:
        if r.d_in is not None and int(r.d_in) != int(cfg.d_model):
            raise SAEBenchError(f"{r.describe()} has d_in={r.d_in} but {model_name} has d_model={cfg.d_model}")
        if r.hook_layer is not None and not (0 <= int(r.hook_layer) < int(cfg.n_layers)):
            raise SAEBenchError(f"{r.describe()} hooks layer {r.hook_layer}; {model_name} has {cfg.n_layers} layers")


def run_saebench(
    saes: Any,
    output_dir: str | Path,
    evals: Iterable[str] | str = EVAL_NAMES,
    *,
    model_name: str | None = None,
    hook_name: str | None = None,
    device: str | None = None,
    llm_dtype: str | None = None,
    llm_batch_size: int | None = None,
    random_seed: int = 42,
    eval_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    model: Any = None,
    load_dataset: Callable[..., Any] | None = None,
    artifacts_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> SAEBenchRun:
    """Run SAEBench evals on several SAEs; returns a :class:`SAEBenchRun` (records and results).

    Args:
        saes: ``{name: source}`` or a list of sources / ``(name, source)`` pairs. A source is a
            ``trainer_i`` folder, a SAELens folder, ``"saelens:RELEASE:SAE_ID"`` (or
            ``("saelens", release, sae_id)``) or a SAELens ``SAE``. Names default to folder names.
        output_dir: results go to ``<output_dir>/<eval>/<name>_custom_sae_eval_results.json``
            (SAEBench's own file names), exported SAEs to ``<output_dir>/saelens/<name>``.
        evals: any of ``"core", "absorption", "sparse_probing", "scr", "tpp"``.
        model_name: the TransformerLens model name; default: the one all SAEs record. A mismatch
            with any SAE raises before anything is loaded.
        hook_name: when given, every SAE must be trained on this hook.
        device: default ``"cuda"`` when available, else ``"cpu"``.
        llm_dtype, llm_batch_size: default SAEBench's values for the model
            (``gemma-2-2b``: bfloat16, 32; unknown models: float32, 32).
        random_seed: every eval's seed.
        eval_overrides: ``{eval: {field: value}}`` on top of SAEBench's defaults, e.g.
            ``{"sparse_probing": {"dataset_names": [...]}, "core": {"n_eval_reconstruction_batches": 20}}``.
        model: a ``HookedTransformer`` to use instead of loading ``model_name`` (its
            ``cfg.model_name`` must be ``model_name`` and its dtype ``llm_dtype``).
        load_dataset: a callable with ``datasets.load_dataset``'s signature serving the data sets
            SAEBench asks for (``LabHC/bias_in_bios``, ``Skylion007/openwebtext``, ...); default:
            the real ``datasets.load_dataset``.
        artifacts_dir: SAEBench's caches; default ``<output_dir>/artifacts``.
        force: re-run evals whose results exist (default: skip them).
        progress: show a progress bar over (SAE, eval) pairs.
    """
    evals = check_eval_names(evals)
    overrides = {k: dict(v) for k, v in (eval_overrides or {}).items()}
    unknown = sorted(set(overrides) - set(EVAL_NAMES))
    if unknown:
        raise SAEBenchError(f"eval_overrides for unknown eval(s) {unknown}; known: {list(EVAL_NAMES)}")
    refs = [describe_sae(src, name) for name, src in _as_named(saes)]
    model_name = check_saes(refs, model_name=model_name, hook_name=hook_name, evals=evals)
    default_bs, default_dtype = default_llm_settings(model_name)
    llm_batch_size = int(llm_batch_size or default_bs)
    llm_dtype = llm_dtype or default_dtype
    from sae_bench.sae_bench_utils.general_utils import str_to_dtype

    try:
        str_to_dtype(llm_dtype)
    except ValueError as e:
        raise SAEBenchError(str(e)) from None
    configs = {
        ev: make_eval_config(ev, model_name, llm_batch_size=llm_batch_size, llm_dtype=llm_dtype,
                             random_seed=random_seed, overrides=overrides.get(ev))
        for ev in evals
    }
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    output_dir = Path(output_dir).resolve()
    artifacts_dir = Path(artifacts_dir).resolve() if artifacts_dir is not None else output_dir / "artifacts"
    staging = output_dir / ".staging"
    if model is not None:
        _check_model(model, model_name, refs, llm_dtype)

    run = SAEBenchRun(output_dir, model_name, [], evals)
    todo: list[tuple[SAERef, list[str]]] = []
    for ref in refs:
        pending = []
        for ev in evals:
            existing = None if force else read_result(output_dir, ref.name, ev)
            if existing is not None:
                run.records.append(EvalRecord(ref.name, ev, "skipped", existing["path"], metrics=existing["metrics"],
                                              reason=existing.get("reason")))
            else:
                pending.append(ev)
        todo.append((ref, pending))

    # Export the trainer folders that still have evals to run (surfaces unusable checkpoints, e.g. a
    # BatchTopK SAE without an inference threshold, before the model is loaded).
    prepared = [prepare_sae(ref, output_dir / "saelens") if pending else ref for ref, pending in todo]
    run.saes = prepared
    n_jobs = sum(len(p) for _, p in todo)
    if n_jobs == 0:
        return run
    if model is None:
        model = _load_model(model_name, device, llm_dtype)
        _check_model(model, model_name, refs, llm_dtype)

    from tqdm.auto import tqdm

    bar = tqdm(total=n_jobs, desc="SAEBench", disable=not progress)
    try:
        with _injected(model, model_name, load_dataset):
            for (ref, pending), prep in zip(todo, prepared):
                if not pending:
                    continue
                sae = load_sae(prep, device=device)
                for ev in pending:
                    bar.set_postfix_str(f"{ref.name}: {ev}")
                    cfg = configs[ev]
                    artifacts = artifacts_dir / ev / _config_hash(ev, cfg)
                    t0 = time.time()
                    for stale in (result_path(output_dir, ref.name, ev),
                                  *([_not_evaluated_path(output_dir, ref.name)] if ev == "absorption" else [])):
                        stale.unlink(missing_ok=True)  # force=True: never leave an old outcome beside a new one
                    _seed_everything(random_seed)
                    with _grad_mode_restored():
                        if ev == "absorption":
                            rec = _run_absorption(cfg, ref.name, sae, device, staging, artifacts, output_dir)
                        elif ev == "core":
                            rec = _run_core(cfg, ref.name, sae, device, llm_dtype, staging, output_dir)
                        else:
                            rec = _run_probing(ev, cfg, ref.name, sae, device, staging, artifacts, output_dir)
                    rec.seconds = time.time() - t0
                    got = read_result(output_dir, ref.name, ev)
                    rec.metrics = got["metrics"] if got else {}
                    run.records.append(rec)
                    bar.update(1)
                del sae
    finally:
        bar.close()
        shutil.rmtree(staging, ignore_errors=True)
    return run
