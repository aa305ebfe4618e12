"""The comparison's configuration: dataclasses, read from a TOML file, checked before any work.

The built-in defaults are the paper's settings (Bussmann et al., ICML 2025, trained like SAEBench's
Gemma-2-2B suites): ``google/gemma-2-2b`` layer 12 residual stream, 500M Pile tokens, batch 2048,
Adam lr 3e-4, widths 16k and 65k, L0 in {20, 40, 80, 160, 320}, Matryoshka groups
[1/32, 1/16, 1/8, 1/4, 17/32]. ``gemma2_2b_l12.toml`` next to this file spells them out;
``smollm2_135m.toml``, ``quick.toml`` (which extends it) and ``tiny.toml`` are the other named
configurations (:data:`CONFIGS`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..harness import apply_overrides, config_from_dict, load_config_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "ARCHITECTURES",
    "CONFIGS",
    "BenchmarkConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "HardwareConfig",
    "ModelConfig",
    "PublishedSuite",
    "TrainingConfig",
    "config_path",
    "load_config",
]

# Architectures this benchmark trains: name -> (what, trainer). "relu" targets an L1 penalty, the
# rest an L0 (a BatchTopK/TopK k, or the target of the log-sparsity and JumpReLU trainers).
ARCHITECTURES = {
    "matryoshka": "matryoshka_plugin.MatryoshkaBatchTopKTrainer (this package; the paper's fixed groups)",
    "matryoshka_every": "matryoshka_plugin.MatryoshkaBatchTopKTrainer (this package; prefix_mode='every')",
    "log_sparsity": "matryoshka_plugin.MatryoshkaLogSparsityTrainer (this package; its defaults, target_l0)",
    "batchtopk": "dictionary_learning.trainers.batch_top_k.BatchTopKTrainer",
    "topk": "dictionary_learning.trainers.top_k.TopKTrainer",
    "relu": "dictionary_learning.trainers.standard.StandardTrainer (L1 penalty)",
    "jumprelu": "dictionary_learning.trainers.jumprelu.JumpReluTrainer (target_l0)",
    "matryoshka_upstream": "dictionary_learning.trainers.matryoshka_batch_top_k.MatryoshkaBatchTopKTrainer",
}
GROUPINGS = ("width_architecture", "width", "all", "sae")
_DTYPES = ("float32", "bfloat16", "float16")
# Where the evals' TransformerLens model comes from: SAEBench loads ``tl_name`` itself ("official",
# the hub), or it is converted from the weights the training loaded ("convert", Llama family).
HOOKED_TRANSFORMER_SOURCES = ("official", "convert")
# data.dataset value for the texts of sae-probes' shipped datasets (benchmarks/.../text.py)
SAE_PROBES_TEXT = "sae-probes"
# The named configurations, next to this file.
CONFIGS = {name: Path(__file__).with_name(f"{name}.toml")
           for name in ("quick", "smollm2_135m", "gemma2_2b_l12", "tiny")}


class ConfigError(ValueError):
    """The benchmark configuration is invalid or does not match what the run folder holds."""


@dataclass
class ModelConfig:
    name: str = "google/gemma-2-2b"  # Hugging Face id: the model's name in the SAEs' configs (lm_name)
    tl_name: str | None = "gemma-2-2b"  # TransformerLens name (SAEBench); None: derived from name
    # Where the weights come from: None (the hub id `name`), a local folder, a .gguf file, or
    # "package:<python package>/<file>" (matryoshka_plugin.language_model.load_language_model).
    source: str | None = None
    gguf_file: str | None = None  # the GGUF file inside a folder `source`
    add_bos_token: bool | None = None  # make the tokenizer prepend its BOS token (None: its default)
    truncate: bool = True  # training loads and runs only the layers up to `layer`
    hooked_transformer: str = "official"  # evals' TransformerLens model: "official" or "convert"
    n_ctx: int | None = None  # context a converted HookedTransformer is built for (None: the model's)
    layer: int = 12
    submodule: str = "model.layers.12"  # attribute path in the HF model (nnsight LanguageModel)
    io: str = "out"  # ActivationBuffer io: the module's output = residual stream after the layer
    dtype: str = "bfloat16"
    d_model: int = 2304
    n_layers: int = 26
    n_params: float = 2.614e9  # for the estimates
    n_embedding_params: float = 5.9e8  # 256000 x 2304 token embeddings (not run per token)


@dataclass
class DataConfig:
    dataset: str = "monology/pile-uncopyrighted"  # streamed with datasets.load_dataset; "sae-probes": local text
    split: str = "train"
    text_column: str = "text"
    ctx_len: int = 1024
    buffer_contexts: int = 1000  # ActivationBuffer n_ctxs: 1000 x 1024 tokens
    refresh_batch_size: int = 32  # contexts per LM forward when refilling the buffer
    remove_bos: bool = True  # Gemma's BOS activation is an outlier; drop it from training
    # dataset = "sae-probes": texts of the probing datasets the evals use are never trained on,
    # and every heldout_every-th remaining text is kept for the evals (served as "sae-probes-heldout").
    exclude_probing_texts: bool = True
    heldout_every: int = 20
    # The activation cache (activations.py): built once, read by every SAE. None: <run_dir>/activations;
    # the CAUSAL_LM_CACHE_DIR environment variable and --cache-dir override it.
    cache_dir: str | None = None
    cache_dtype: str = "bfloat16"  # stored activations
    cache_shard_texts: int = 2048  # texts per shard (the unit a build resumes from)
    heldout_tokens: int = 1_048_576  # held-out activations for the metrics (held-out texts)
    # Tokens with a norm above this multiple of the held-out median are dropped from training, the
    # held-out metrics and core's reconstruction (passed through there): massive-activation attention
    # sinks. None: every token.
    max_norm_ratio: float | None = None


@dataclass
class TrainingConfig:
    architectures: list[str] = field(default_factory=lambda: ["matryoshka", "batchtopk", "relu"])
    tokens: int = 500_000_000
    batch_size: int = 2048
    lr: float = 3e-4
    widths: list[int] = field(default_factory=lambda: [16384, 65536])
    l0s: list[int] = field(default_factory=lambda: [20, 40, 80, 160, 320])
    group_fractions: list[float] = field(default_factory=lambda: [1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32])
    # ReLU SAEs cannot target an L0: one L1 penalty per entry of l0s (on normalised activations),
    # strongest first; the report plots every SAE at its measured L0.
    relu_l1_penalties: list[float] = field(default_factory=lambda: [0.06, 0.04, 0.03, 0.02, 0.012])
    warmup_steps: int = 1000
    decay_start_fraction: float | None = 0.8  # linear lr decay over the last 20% of steps
    sparsity_warmup_steps: int = 5000  # ReLU and JumpReLU only
    threshold_start_step: int = 1000  # BatchTopK inference-threshold estimation starts here
    normalize_activations: bool = True  # trainSAE's unit mean-squared-norm scaling (folded back on save)
    autocast_dtype: str = "float32"
    group_by: str = "width_architecture"  # SAEs trained together on one activation stream
    seed: int = 0
    # More seeds for some architectures (the main rows): architecture -> seeds (others: [seed]).
    seeds: dict[str, list[int]] = field(default_factory=dict)
    # The lr sweep: every architecture at each of lr_sweep, at L0 lr_sweep_l0 (ReLU: its penalty for
    # that L0), first; then every L0 at the lr with the lowest held-out FVU (run_dir/lr_sweep.json).
    # Empty: every SAE trains at lrs.get(architecture, lr).
    lr_sweep: list[float] = field(default_factory=list)
    lr_sweep_l0: int | None = None
    lr_sweep_tokens: int | None = None  # training tokens of each sweep SAE (None: training.tokens)
    lrs: dict[str, float] = field(default_factory=dict)  # per-architecture lr without a sweep
    baselines: str = "train"  # "train" or "published" (SAEBench's suites through SAELens)
    checkpoint_every: int = 2000  # full-state checkpoints (steps): an interrupted group resumes from the newest
    nproc: int = 1  # processes (GPUs) the SAEs of a group are spread over (torchrun; see --nproc)

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    @property
    def sweep_steps(self) -> int:
        """Steps of each lr-sweep SAE."""
        return (self.lr_sweep_tokens or self.tokens) // self.batch_size


@dataclass
class PublishedSuite:
    label: str  # architecture label in the report
    release: str  # SAELens release
    sae_ids: str = r"^blocks\.12\.hook_resid_post__trainer_\d+$"  # which SAEs of the release


def _default_published() -> list[PublishedSuite]:
    # The Gemma-2-2B layer-12 suites of SAEBench that SAELens' pretrained directory lists.
    return [
        PublishedSuite("topk (SAEBench)", "sae_bench_gemma-2-2b_topk_width-2pow14_date-1109"),
        PublishedSuite("topk (SAEBench)", "sae_bench_gemma-2-2b_topk_width-2pow16_date-1109"),
        PublishedSuite("relu (SAEBench)", "sae_bench_gemma-2-2b_vanilla_width-2pow14_date-1109"),
        PublishedSuite("relu (SAEBench)", "sae_bench_gemma-2-2b_vanilla_width-2pow16_date-1109"),
        PublishedSuite("matryoshka (SAEBench)", "saebench_gemma-2-2b_width-2pow14_date-0107"),
        PublishedSuite("matryoshka (SAEBench)", "saebench_gemma-2-2b_width-2pow16_date-0107"),
    ]


@dataclass
class EvalConfig:
    # SCR and TPP stay for comparison with SAEBench's published numbers; Chanin (arXiv:2605.18229)
    # finds them unreliable at these settings and sae-probes' sparse probing the most reliable.
    evals: list[str] = field(default_factory=lambda: ["core", "absorption", "sparse_probing",
                                                      "sparse_probing_sae_probes", "scr", "tpp", "meta_structure"])
    llm_batch_size: int | None = None  # default: SAEBench's for the model (gemma-2-2b: 32)
    llm_dtype: str | None = None  # default: SAEBench's for the model (gemma-2-2b: bfloat16)
    random_seed: int = 42
    seeds: list[int] | None = None  # repeat the evals that sample once per seed (mean and std in the report)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # per eval, SAEBench config fields
    extra_saes: dict[str, str] = field(default_factory=dict)  # name -> folder or "saelens:RELEASE:ID"


@dataclass
class HardwareConfig:
    """Throughputs assumed by the time estimate (effective, not peak)."""

    lm_tflops: float = 250.0  # bf16 LM forward, H100-class GPU
    sae_tflops: float = 120.0  # fp32/TF32 SAE training matmuls
    gpu_memory_gb: float | None = 80.0  # warn when the estimate exceeds it (None: no check)


@dataclass
class BenchmarkConfig:
    run_dir: str = "runs/gemma2_2b_l12"
    device: str = "cuda"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evals: EvalConfig = field(default_factory=EvalConfig)
    published: list[PublishedSuite] = field(default_factory=_default_published)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    # A second copy of the report and results.csv, for publishing (docs/results/causal_lm_comparison/<name>).
    publish_dir: str | None = None
    source: str | None = None  # the file it was read from

    @property
    def probing_datasets(self) -> list[str]:
        """The sae-probes datasets the sparse_probing_sae_probes eval uses (theirs: every one), also
        when a config that leaves the eval out keeps its settings (the training text stays the same)."""
        e = self.evals
        if "sparse_probing_sae_probes" not in e.evals and "sparse_probing_sae_probes" not in e.overrides:
            return []
        names = self.evals.overrides.get("sparse_probing_sae_probes", {}).get("dataset_names")
        if names is None:
            from sae_probes import DATASETS

            names = list(DATASETS)
        return list(names)

    @property
    def tl_model_name(self) -> str:
        from matryoshka_plugin.hook_names import tl_model_name

        return self.model.tl_name or str(tl_model_name(self.model.name))

    @property
    def hook_name(self) -> str:
        from matryoshka_plugin.hook_names import tl_hook_name

        return tl_hook_name(self.model.submodule, self.model.io, self.model.layer, self.model.name)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    def validate(self) -> "BenchmarkConfig":
        """Raise :class:`ConfigError` for anything that would fail later; returns self."""
        from matryoshka_plugin.saebench import SAEBenchError, check_eval_names, make_eval_config

        m, d, t, e = self.model, self.data, self.training, self.evals
        errors: list[str] = []
        if m.dtype not in _DTYPES:
            errors.append(f"model.dtype must be one of {_DTYPES}, got {m.dtype!r}")
        if m.hooked_transformer not in HOOKED_TRANSFORMER_SOURCES:
            errors.append(f"model.hooked_transformer must be one of {HOOKED_TRANSFORMER_SOURCES}, got {m.hooked_transformer!r}")
        if m.n_ctx is not None and (isinstance(m.n_ctx, bool) or not isinstance(m.n_ctx, int) or m.n_ctx < 2):
            errors.append(f"model.n_ctx must be an integer of at least 2 or absent, got {m.n_ctx!r}")
        if d.dataset == SAE_PROBES_TEXT:
            if d.exclude_probing_texts and "sparse_probing_sae_probes" in e.evals and (
                    "dataset_names" not in e.overrides.get("sparse_probing_sae_probes", {})):
                errors.append("data.dataset = 'sae-probes' keeps the probing datasets' texts out of training, but "
                              "sparse_probing_sae_probes uses every sae-probes dataset: name the probing datasets in "
                              "[evals.overrides.sparse_probing_sae_probes] dataset_names")
        if t.autocast_dtype not in _DTYPES:
            errors.append(f"training.autocast_dtype must be one of {_DTYPES}, got {t.autocast_dtype!r}")
        if not re.match(r"^[A-Za-z_][\w]*(\.\w+)*$", m.submodule):
            errors.append(f"model.submodule {m.submodule!r} is not an attribute path like 'model.layers.12'")
        elif re.search(r"\.(\d+)$", m.submodule) and int(m.submodule.rsplit(".", 1)[1]) != m.layer:
            errors.append(f"model.submodule {m.submodule!r} does not end in model.layer={m.layer}")
        if not 0 <= m.layer < m.n_layers:
            errors.append(f"model.layer={m.layer} is outside the model's {m.n_layers} layers")
        try:
            self.hook_name
        except ValueError as ex:
            errors.append(f"model: {ex}")
        unknown = [a for a in t.architectures if a not in ARCHITECTURES]
        if unknown:
            errors.append(f"unknown training.architectures {unknown}; known: {sorted(ARCHITECTURES)}")
        if len(set(t.architectures)) != len(t.architectures):
            errors.append(f"training.architectures has duplicates: {t.architectures}")
        if t.baselines not in ("train", "published"):
            errors.append(f"training.baselines must be 'train' or 'published', got {t.baselines!r}")
        for key in ("checkpoint_every", "nproc"):
            value = getattr(t, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                errors.append(f"training.{key} must be a positive integer, got {value!r}")
        if t.normalize_activations and "matryoshka_upstream" in t.architectures:
            errors.append("dictionary_learning's Matryoshka SAE (matryoshka_upstream) has no scale_biases, so it "
                          "cannot train with training.normalize_activations = true")
        for arch, seeds in t.seeds.items():
            if arch not in t.architectures:
                errors.append(f"training.seeds names {arch!r}, which is not in training.architectures")
            elif (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                  or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in seeds)):
                errors.append(f"training.seeds.{arch} must be a list of distinct non-negative integers, got {seeds!r}")
        for arch in t.lrs:
            if arch not in t.architectures:
                errors.append(f"training.lrs names {arch!r}, which is not in training.architectures")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in [*t.lr_sweep, *t.lrs.values()]):
            errors.append("training.lr_sweep and training.lrs must hold positive learning rates")
        if t.lr_sweep and t.lr_sweep_l0 not in t.l0s:
            errors.append(f"training.lr_sweep_l0 must be one of training.l0s {t.l0s}, got {t.lr_sweep_l0!r}")
        if t.group_by not in GROUPINGS:
            errors.append(f"training.group_by must be one of {GROUPINGS}, got {t.group_by!r}")
        if t.lr_sweep and t.lr_sweep_tokens is not None and (isinstance(t.lr_sweep_tokens, bool) or not isinstance(t.lr_sweep_tokens, int)
                                              or not 0 < t.lr_sweep_tokens <= t.tokens):
            errors.append(f"training.lr_sweep_tokens must be a positive integer <= training.tokens, got {t.lr_sweep_tokens!r}")
        # The sweep's shorter runs must fit the schedule too.
        steps = min(t.steps, t.sweep_steps) if t.lr_sweep else t.steps
        if steps < 1:
            errors.append(f"training.tokens={t.tokens} is less than one batch of {t.batch_size}")
        for key in ("warmup_steps", "threshold_start_step"):
            if not 0 <= getattr(t, key) < steps:
                errors.append(f"training.{key}={getattr(t, key)} must be in [0, steps={steps})")
        if t.lr_sweep and t.nproc > 1:
            errors.append("training.lr_sweep runs in one process: sweep with nproc = 1 first, then train with more")
        if {"relu", "jumprelu"} & set(t.architectures) and not 0 <= t.sparsity_warmup_steps < steps:
            errors.append(f"training.sparsity_warmup_steps={t.sparsity_warmup_steps} must be in [0, steps={steps})")
        if t.decay_start_fraction is not None:
            if not 0 < t.decay_start_fraction < 1:
                errors.append("training.decay_start_fraction must be in (0, 1) or absent")
            elif int(steps * t.decay_start_fraction) <= t.warmup_steps:
                errors.append("training: the lr decay would start before warm-up ends")
        if not t.widths or any(w < 1 for w in t.widths):
            errors.append(f"training.widths must be positive, got {t.widths}")
        if not t.l0s or any(k < 1 for k in t.l0s):
            errors.append(f"training.l0s must be positive, got {t.l0s}")
        elif t.widths and max(t.l0s) > min(t.widths):
            errors.append(f"training.l0s {t.l0s} exceed the smallest width {min(t.widths)}")
        if "relu" in t.architectures and len(t.relu_l1_penalties) != len(t.l0s):
            errors.append(
                f"training.relu_l1_penalties needs one penalty per L0 ({len(t.l0s)}), got {len(t.relu_l1_penalties)}"
            )
        if any(a.startswith("matryoshka") for a in t.architectures):
            fr = t.group_fractions
            if not fr or any(f <= 0 for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
                errors.append(f"training.group_fractions must be positive and sum to 1, got {fr}")
            else:
                for w in t.widths:
                    sizes = [int(f * w) for f in fr[:-1]]
                    if min(sizes + [w - sum(sizes)]) < 1:
                        errors.append(f"training.group_fractions {fr} leave an empty group at width {w}")
        if d.max_norm_ratio is not None and (isinstance(d.max_norm_ratio, bool)
                                             or not isinstance(d.max_norm_ratio, (int, float)) or not d.max_norm_ratio > 1):
            errors.append(f"data.max_norm_ratio must be a number > 1 (a multiple of the median norm) or absent, "
                          f"got {d.max_norm_ratio!r}")
        if d.cache_dtype not in _DTYPES:
            errors.append(f"data.cache_dtype must be one of {_DTYPES}, got {d.cache_dtype!r}")
        for key in ("cache_shard_texts", "heldout_tokens"):
            value = getattr(d, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                errors.append(f"data.{key} must be a positive integer, got {value!r}")
        if d.cache_dir is not None and not isinstance(d.cache_dir, str):
            errors.append(f"data.cache_dir must be a path or absent, got {d.cache_dir!r}")
        if isinstance(d.heldout_every, bool) or not isinstance(d.heldout_every, int) or d.heldout_every < 2:
            errors.append(f"data.heldout_every must be an integer of at least 2, got {d.heldout_every!r}")
        if d.ctx_len < 2 or d.buffer_contexts < 1 or d.refresh_batch_size < 1:
            errors.append("data.ctx_len, data.buffer_contexts and data.refresh_batch_size must be positive")
        if d.buffer_contexts * (d.ctx_len - int(d.remove_bos)) < 2 * t.batch_size:
            errors.append(
                f"the activation buffer (data.buffer_contexts x ctx_len) must hold at least two batches of {t.batch_size}"
            )
        try:
            evals = check_eval_names(e.evals)
            # Settings of an eval left out of evals.evals stay valid (a config that extends another may
            # run some of its evals, and the sae-probes datasets also decide the training text), and
            # are checked all the same.
            others = check_eval_names(list(e.overrides)) if e.overrides else []
            for ev in dict.fromkeys([*evals, *others]):
                make_eval_config(ev, self.tl_model_name, llm_batch_size=e.llm_batch_size or 32,
                                 llm_dtype=e.llm_dtype or "float32", overrides=e.overrides.get(ev))
        except SAEBenchError as ex:
            errors.append(f"evals: {ex}")
        if e.seeds is not None and (not e.seeds or len(set(e.seeds)) != len(e.seeds)
                                    or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in e.seeds)):
            errors.append(f"evals.seeds must be a list of distinct non-negative integers, got {e.seeds!r}")
        if e.llm_dtype is not None and e.llm_dtype not in _DTYPES:
            errors.append(f"evals.llm_dtype must be one of {_DTYPES}, got {e.llm_dtype!r}")
        if t.baselines == "published" and not self.published:
            errors.append("training.baselines = 'published' needs [[published]] suites")
        if errors:
            where = f" in {self.source}" if self.source else ""
            raise ConfigError(f"invalid benchmark configuration{where}:\n  - " + "\n  - ".join(errors))
        return self


def parse_override(item: str) -> tuple[str, Any]:
    """``"training.tokens=1000000"`` -> ``("training.tokens", 1000000)`` (TOML values; bare words are strings)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def config_path(name_or_path: str | Path) -> Path:
    """A configuration's file: one of :data:`CONFIGS` by name (``smollm2_135m``, or an unambiguous
    prefix such as ``smollm2``), or a path."""
    key = str(name_or_path)
    if key in CONFIGS:
        return CONFIGS[key]
    if "/" not in key and not key.endswith(".toml"):
        matches = [n for n in CONFIGS if n.startswith(key)]
        if len(matches) == 1:
            return CONFIGS[matches[0]]
        raise ConfigError(f"no configuration named {key!r}" + (f" (matches {matches})" if matches else "")
                          + f"; the named ones are {sorted(CONFIGS)}, or pass a .toml file")
    return Path(name_or_path)


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                validate: bool = True) -> BenchmarkConfig:
    """Read a TOML config (a file, or a name of :data:`CONFIGS`; ``None``: the built-in paper
    settings), apply dotted ``overrides`` (``{"training.tokens": 10**6}``) and validate. A file may
    start from another with ``extends = "NAME"`` (a named configuration or a path relative to it)."""
    try:
        data = load_config_file(config_path(path), named=CONFIGS, cls=BenchmarkConfig) if path is not None else {}
        cfg = apply_overrides(config_from_dict(BenchmarkConfig, data), overrides or {})
    except ConfigError:
        raise
    except ValueError as e:  # the harness names the file or the setting
        raise ConfigError(str(e)) from None
    cfg.source = str(config_path(path)) if path is not None else None
    return cfg.validate() if validate else cfg
