"""What a run will do: the SAEs, their training groups, what is already done, and estimates of
GPU memory and time, all computed without loading a model."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..harness import width_label
from .config import SAE_PROBES_TEXT, BenchmarkConfig, ConfigError

__all__ = ["SAESpec", "Plan", "Estimate", "build_plan", "estimate", "format_plan", "trainer_config", "group_spec"]

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GB = 1e9


@dataclass
class SAESpec:
    name: str
    architecture: str  # matryoshka, batchtopk, relu, matryoshka_upstream, a published label, or "extra"
    source: str  # "train" | "published" | "extra"
    width: int | None = None
    k: int | None = None  # BatchTopK k = target L0
    l1_penalty: float | None = None
    group: str | None = None
    index: int | None = None  # trainer_i inside the group
    location: str | None = None  # folder, or "saelens:RELEASE:SAE_ID"
    seed: int | None = None
    lr: float | None = None  # None: not known until the lr sweep has run
    stage: str = "main"  # "sweep": an SAE of the lr sweep (trained first, not evaluated by SAEBench)


@dataclass
class Plan:
    cfg: BenchmarkConfig
    saes: list[SAESpec]
    groups: dict[str, list[SAESpec]]
    run_dir: Path

    def group_dir(self, group: str) -> Path:
        return self.run_dir / "train" / group

    def group_done(self, group: str) -> bool:
        d = self.group_dir(group)
        return (d / "group.json").is_file() and all(
            (d / f"trainer_{s.index}" / "ae.pt").is_file() for s in self.groups[group]
        )

    def pending_groups(self) -> list[str]:
        return [g for g in self.groups if not self.group_done(g)]

    @property
    def sweep_groups(self) -> list[str]:
        return [g for g, specs in self.groups.items() if specs[0].stage == "sweep"]

    @property
    def sweep_file(self) -> Path:
        return sweep_file(self.run_dir)

    def waits_for_sweep(self, group: str) -> bool:
        return any(s.lr is None for s in self.groups[group])

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / "evals"

    @property
    def report_dir(self) -> Path:
        return self.run_dir / "report"


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower() or "sae"


def _published_specs(cfg: BenchmarkConfig) -> list[SAESpec]:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    specs = []
    for suite in cfg.published:
        if suite.release not in directory:
            raise ConfigError(f"SAELens lists no release {suite.release!r} (published suite {suite.label!r})")
        entry = directory[suite.release]
        if entry.model != cfg.tl_model_name:
            raise ConfigError(
                f"published suite {suite.release} is for {entry.model!r}, the benchmark evaluates {cfg.tl_model_name!r}"
            )
        try:
            pattern = re.compile(suite.sae_ids)
        except re.error as e:
            raise ConfigError(f"published suite {suite.release}: bad sae_ids regex: {e}") from None
        ids = sorted((i for i in entry.saes_map if pattern.search(i)),
                     key=lambda i: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", i)])
        if not ids:
            raise ConfigError(f"published suite {suite.release} has no SAE matching {suite.sae_ids!r}")
        m = re.search(r"2pow(\d+)", suite.release)
        width = 2 ** int(m.group(1)) if m else None
        for sae_id in ids:
            tail = re.sub(r"[^A-Za-z0-9]+", "_", sae_id.split("__")[-1])
            name = f"{_slug(suite.label)}_{width_label(width) if width else 'w'}_{tail}"
            specs.append(SAESpec(name, suite.label, "published", width=width,
                                 location=f"saelens:{suite.release}:{sae_id}"))
    return specs


def sweep_file(run_dir: str | Path) -> Path:
    """The lr sweep's result: per architecture, each lr's held-out FVU, L0 and dead latents, and the chosen lr."""
    return Path(run_dir) / "lr_sweep.json"


def _chosen_lrs(cfg: BenchmarkConfig) -> dict[str, float]:
    """The lr sweep's choices (:func:`sweep_file`), if it has run with these settings."""
    path = sweep_file(cfg.run_dir)
    if not cfg.training.lr_sweep or not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); delete it to redo the lr sweep's choice") from None
    if saved.get("lrs") != [float(x) for x in cfg.training.lr_sweep] or saved.get("l0") != cfg.training.lr_sweep_l0:
        raise ConfigError(f"{path} was made for lrs {saved.get('lrs')} at L0 {saved.get('l0')}, the configuration "
                          f"sweeps {cfg.training.lr_sweep} at L0 {cfg.training.lr_sweep_l0}; use another run_dir")
    made = {"steps": saved.get("steps", cfg.training.steps), "max_norm_ratio": saved.get("max_norm_ratio")}
    asked = {"steps": cfg.training.sweep_steps, "max_norm_ratio": cfg.data.max_norm_ratio}
    if made != asked:
        raise ConfigError(f"{path} was made with {made}, the configuration asks for {asked}; use another run_dir")
    return {arch: float(r["chosen_lr"]) for arch, r in saved["architectures"].items()}


def build_plan(cfg: BenchmarkConfig) -> Plan:
    """The SAEs to train and evaluate, grouped for training; raises ConfigError on conflicts.

    With ``training.lr_sweep``, the sweep's SAEs (every architecture at each lr, at L0
    ``lr_sweep_l0``) come first, in groups ``sweep_<width>_<architecture>``; the main SAEs get
    each architecture's chosen lr once ``lr_sweep.json`` exists (until then their lr is None)."""
    t = cfg.training
    run_dir = Path(cfg.run_dir)
    archs = list(t.architectures)
    if t.baselines == "published":
        archs = [a for a in archs if a.startswith("matryoshka")]
    chosen = _chosen_lrs(cfg)
    specs: list[SAESpec] = []
    sweep: list[SAESpec] = []
    for arch in archs:
        for width in t.widths:
            for i, k in enumerate(t.l0s):
                if arch == "relu":
                    pen = t.relu_l1_penalties[i]
                    base = SAESpec(f"relu_{width_label(width)}_l1-{pen:g}", arch, "train", width=width,
                                   l1_penalty=float(pen))
                else:
                    base = SAESpec(f"{arch}_{width_label(width)}_k{k}", arch, "train", width=width, k=int(k))
                if t.lr_sweep and k == t.lr_sweep_l0:
                    for lr in t.lr_sweep:
                        sweep.append(dataclasses.replace(base, name=f"{base.name}_lr{lr:g}", seed=t.seed,
                                                         lr=float(lr), stage="sweep"))
                lr = chosen.get(arch) if t.lr_sweep else t.lrs.get(arch, t.lr)
                for seed in t.seeds.get(arch, [t.seed]):
                    suffix = "" if seed == t.seed else f"_s{seed}"
                    specs.append(dataclasses.replace(base, name=base.name + suffix, seed=int(seed), lr=lr))
    groups: dict[str, list[SAESpec]] = {}
    for s in sweep + specs:
        if s.stage == "sweep":
            key = f"sweep_{width_label(s.width)}_{s.architecture}"
        else:
            key = {"width_architecture": f"{width_label(s.width)}_{s.architecture}", "width": width_label(s.width),
                   "all": "all", "sae": s.name}[t.group_by]
        s.group = key
        s.index = len(groups.setdefault(key, []))
        groups[key].append(s)
        s.location = str(run_dir / "train" / key / f"trainer_{s.index}")
    specs = sweep + specs
    if t.baselines == "published":
        specs += _published_specs(cfg)
    for name, location in cfg.evals.extra_saes.items():
        specs.append(SAESpec(name, "extra", "extra", location=str(location)))
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"two SAEs would share the name(s) {dupes}")
    return Plan(cfg, specs, groups, run_dir)


# ----------------------------------------------------------------------------------------------
# Trainer configs
# ----------------------------------------------------------------------------------------------


def trainer_config(cfg: BenchmarkConfig, spec: SAESpec) -> dict[str, Any]:
    """The ``trainSAE`` config dict for one SAE (the ``"trainer"`` key holds the class)."""
    t, m = cfg.training, cfg.model
    if spec.lr is None:
        raise ConfigError(f"{spec.name}: its lr is chosen by the lr sweep, which has not finished")
    steps = t.sweep_steps if spec.stage == "sweep" else t.steps
    base = dict(
        steps=steps, activation_dim=m.d_model, dict_size=spec.width, layer=m.layer, lm_name=m.name,
        submodule_name=m.submodule, lr=spec.lr, warmup_steps=t.warmup_steps,
        decay_start=int(steps * t.decay_start_fraction) if t.decay_start_fraction else None,
        seed=t.seed if spec.seed is None else spec.seed, device=cfg.device, wandb_name=spec.name,
    )
    arch = spec.architecture
    if arch in ("matryoshka", "matryoshka_every"):
        from matryoshka_plugin import MatryoshkaBatchTopKTrainer

        if arch == "matryoshka_every":
            return dict(trainer=MatryoshkaBatchTopKTrainer, k=spec.k, prefix_mode="every",
                        threshold_start_step=t.threshold_start_step, **base)
        return dict(trainer=MatryoshkaBatchTopKTrainer, k=spec.k, group_fractions=list(t.group_fractions),
                    threshold_start_step=t.threshold_start_step, **base)
    if arch == "log_sparsity":
        from matryoshka_plugin import MatryoshkaLogSparsityTrainer

        # Its own defaults (warm-up, decay, Adam betas, controller); only the lr and the L0 target are set.
        keep = ("steps", "activation_dim", "dict_size", "layer", "lm_name", "submodule_name", "lr", "seed", "device",
                "wandb_name")
        return dict(trainer=MatryoshkaLogSparsityTrainer, target_l0=float(spec.k), **{k: base[k] for k in keep})
    if arch == "matryoshka_upstream":
        from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer

        return dict(trainer=MatryoshkaBatchTopKTrainer, k=spec.k, group_fractions=list(t.group_fractions),
                    threshold_start_step=t.threshold_start_step, **base)
    if arch == "batchtopk":
        from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer

        return dict(trainer=BatchTopKTrainer, k=spec.k, threshold_start_step=t.threshold_start_step, **base)
    if arch == "topk":
        from dictionary_learning.trainers.top_k import TopKTrainer

        return dict(trainer=TopKTrainer, k=spec.k, threshold_start_step=t.threshold_start_step, **base)
    if arch == "relu":
        from dictionary_learning.trainers.standard import StandardTrainer

        return dict(trainer=StandardTrainer, l1_penalty=spec.l1_penalty,
                    sparsity_warmup_steps=t.sparsity_warmup_steps, **base)
    if arch == "jumprelu":
        from dictionary_learning.trainers.jumprelu import JumpReluTrainer

        return dict(trainer=JumpReluTrainer, target_l0=float(spec.k), sparsity_warmup_steps=t.sparsity_warmup_steps,
                    **base)
    raise ConfigError(f"no trainer for architecture {arch!r}")


def group_spec(cfg: BenchmarkConfig, group: list[SAESpec]) -> dict[str, Any]:
    """What determines a training group's result (compared on resume)."""
    trainers = []
    for s in group:
        c = trainer_config(cfg, s)
        cls = c.pop("trainer")
        c.pop("device")
        trainers.append({"name": s.name, "trainer": f"{cls.__module__}.{cls.__qualname__}", **c})
    d, m = cfg.data, cfg.model
    data = {k: getattr(d, k) for k in ("dataset", "split", "text_column", "ctx_len", "remove_bos", "max_norm_ratio")}
    if d.dataset == SAE_PROBES_TEXT:  # which texts are trained on
        data.update(heldout_every=d.heldout_every,
                    excluded=sorted(cfg.probing_datasets) if d.exclude_probing_texts else [])
    return {
        "trainers": trainers,
        "data": data,
        "model": {"name": m.name, "source": m.source, "gguf_file": m.gguf_file, "add_bos_token": m.add_bos_token,
                  "submodule": m.submodule, "io": m.io, "dtype": m.dtype},
        "batch_size": cfg.training.batch_size,
        "normalize_activations": cfg.training.normalize_activations,
    }


def check_group_folder(plan: Plan, group: str) -> None:
    """A finished group folder must hold what the config asks for."""
    path = plan.group_dir(group) / "group.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); delete {path.parent} to retrain it") from None
    expected = json.loads(json.dumps(group_spec(plan.cfg, plan.groups[group])))
    if saved != expected:
        diff = _first_difference(saved, expected)
        raise ConfigError(
            f"{path.parent} was trained with different settings ({diff}); use another run_dir or delete that folder"
        )


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return f"{where}: folder has {a!r}, config asks for {b!r}"


# ----------------------------------------------------------------------------------------------
# Estimates
# ----------------------------------------------------------------------------------------------

# SAEBench's documented Gemma-2-2B runtimes (the READMEs of its evals): a one-off cost per model
# and layer (activations, probes) and a cost per SAE, in seconds, per dataset / class pair.
_SAEBENCH_GEMMA_SECONDS = {
    "absorption": (30 * 60, 10 * 60),
    "sparse_probing": (2 * 60, 20),  # per dataset
    "scr": (2 * 60, 40),  # per (dataset, class pair)
    "tpp": (2 * 60, 40),  # per dataset
    # Not documented by SAEBench; assumed: the model's activations on one sae-probes data set
    # (at most 1500 texts) once, and the k-sparse L1 probes of one SAE on it.
    "sparse_probing_sae_probes": (60, 5),  # per dataset
    "meta_structure": (0, 60),  # "less than a minute on a 4090" (its README)
}
_GEMMA_PARAMS = 2.614e9


@dataclass
class Estimate:
    train_peak_gb: float
    train_breakdown_gb: dict[str, float]
    eval_peak_gb: float
    eval_breakdown_gb: dict[str, float]
    group_hours: dict[str, float]
    group_memory_gb: dict[str, float]
    """Per GPU: the most loaded GPU's SAEs + Adam when the group is spread over ``nproc`` GPUs."""
    eval_hours: dict[str, float]
    pending_train_hours: float
    pending_eval_hours: float
    notes: list[str] = field(default_factory=list)

    @property
    def total_hours(self) -> float:
        return self.pending_train_hours + self.pending_eval_hours


def _sae_params(d: int, n: int) -> int:
    return 2 * d * n + n + d


def estimate(plan: Plan, pending_evals: dict[str, int] | None = None) -> Estimate:
    """GPU memory and time, from the config alone (assumed throughputs in ``[hardware]``)."""
    from matryoshka_plugin.saebench import default_llm_settings, make_eval_config

    cfg = plan.cfg
    m, d, t, hw = cfg.model, cfg.data, cfg.training, cfg.hardware
    lm_bytes = _DTYPE_BYTES[m.dtype]
    lm_weights = m.n_params * lm_bytes
    buffer = d.buffer_contexts * d.ctx_len * m.d_model * lm_bytes
    # Forward pass up to the hooked layer: about a dozen d_model-sized tensors per token live at once.
    lm_work = d.refresh_batch_size * d.ctx_len * m.d_model * lm_bytes * 12
    group_mem: dict[str, float] = {}
    group_hours: dict[str, float] = {}
    layers_run = (m.layer + 1) / m.n_layers
    lm_flops_per_token = 2 * (m.n_params - m.n_embedding_params) * layers_run
    norm_tokens = 100 * t.batch_size if t.normalize_activations else 0
    from matryoshka_plugin.distributed import assign_trainers

    for g, specs in plan.groups.items():
        tokens = (t.sweep_steps * t.batch_size if g in plan.sweep_groups else t.tokens) + norm_tokens
        # With nproc GPUs the SAEs are spread as train(distributed="trainers") spreads them; the
        # most loaded GPU sets the memory and, after rank 0's LM forward, the time.
        shares = [r for r in assign_trainers([m.d_model * s.width for s in specs], t.nproc) if r]
        per_gpu_mem, per_gpu_flops = [], []
        for share in shares:
            part = [specs[i] for i in share]
            # fp32 weights, gradients and Adam's two moments: 16 bytes per parameter; plus the dense
            # [batch, width] pre-activations, their ReLU/top-k masks and gradients (about 4 at once).
            states = sum(16 * _sae_params(m.d_model, s.width) for s in part)
            transient = max(4 * 4 * t.batch_size * s.width for s in part)
            per_gpu_mem.append((states + transient) / GB)
            per_gpu_flops.append(sum(12 * m.d_model * s.width for s in part))  # fwd + bwd of encoder and decoder
        group_mem[g] = max(per_gpu_mem)
        # The language model runs once, for the activation cache (below), not per group.
        group_hours[g] = tokens * max(per_gpu_flops) / (hw.sae_tflops * 1e12) / 3600
    train_breakdown = {"LM weights": lm_weights / GB, "activation buffer": buffer / GB, "LM forward": lm_work / GB,
                       ("largest training group (SAEs + Adam)" if t.nproc == 1 else
                        f"largest group's share on one of {t.nproc} GPUs (SAEs + Adam)"): max(group_mem.values(), default=0.0)}
    train_peak = sum(train_breakdown.values())

    # Evals
    e = cfg.evals
    bs_default, dtype_default = default_llm_settings(cfg.tl_model_name)
    llm_bs = e.llm_batch_size or bs_default
    llm_dtype = e.llm_dtype or dtype_default
    eval_bytes = _DTYPE_BYTES.get(llm_dtype, 4)
    vocab = m.n_embedding_params / m.d_model
    widths = [s.width for s in plan.saes if s.width] or [max(t.widths)]
    configs = {ev: make_eval_config(ev, cfg.tl_model_name, llm_batch_size=llm_bs, llm_dtype=llm_dtype,
                                    overrides=e.overrides.get(ev)) for ev in e.evals}
    ctx = 128
    probe_acts = 0.0
    for ev, c in configs.items():
        if ev == "sparse_probing":
            probe_acts = max(probe_acts, (c.probe_train_set_size + c.probe_test_set_size) * c.context_length)
            ctx = max(ctx, c.context_length)
        elif ev in ("scr", "tpp"):
            probe_acts = max(probe_acts, (c.train_set_size + c.test_set_size) * c.context_length)
    eval_breakdown = {
        "LM weights": m.n_params * eval_bytes / GB,
        "largest SAE": _sae_params(m.d_model, max(widths)) * eval_bytes / GB,
        "cached probing activations": probe_acts * m.d_model * eval_bytes / GB,
        "logits of one LM batch (fp32, x2)": 2 * llm_bs * ctx * vocab * 4 / GB,
    }
    eval_peak = sum(eval_breakdown.values())
    scale = m.n_params / _GEMMA_PARAMS
    n_saes = len(plan.saes)
    from matryoshka_plugin.saebench import SEEDED_EVALS

    runs = {ev: n_saes * (len(e.seeds) if e.seeds and ev in SEEDED_EVALS else 1) for ev in e.evals}
    pending = pending_evals if pending_evals is not None else runs
    eval_hours: dict[str, float] = {}
    for ev, c in configs.items():
        n = pending.get(ev, 0)
        if n == 0:
            eval_hours[ev] = 0.0
            continue
        if ev == "core":
            recon = c["n_eval_reconstruction_batches"] * c["eval_batch_size_prompts"] * c["context_size"]
            sparsity = c["n_eval_sparsity_variance_batches"] * c["eval_batch_size_prompts"] * c["context_size"]
            flops = 3 * recon * 2 * m.n_params + sparsity * lm_flops_per_token
            eval_hours[ev] = n * flops / (hw.lm_tflops * 1e12) / 3600
            continue
        once, per_sae = _SAEBENCH_GEMMA_SECONDS[ev]
        units = 1
        if ev in ("sparse_probing", "tpp", "sparse_probing_sae_probes"):
            units = len(c.dataset_names)
        elif ev == "scr":
            units = sum(len(c.column1_vals_lookup.get(ds, [])) for ds in c.dataset_names)
        eval_hours[ev] = scale * units * (once + n * per_sae) / 3600
    notes = []
    from .activations import cache_dir, read_manifest, split_tokens

    try:
        manifest = read_manifest(cache_dir(cfg)) or {}
    except ConfigError:
        manifest = {}
    missing = max(0, t.tokens - split_tokens(manifest, "train")) + max(0, d.heldout_tokens - split_tokens(manifest, "heldout"))
    cache_hours = missing * lm_flops_per_token / (hw.lm_tflops * 1e12) / 3600
    notes.append(f"activation cache {cache_dir(cfg)}: {missing:,} tokens still to extract (~{_hours(cache_hours)}, once)")
    if hw.gpu_memory_gb is not None and max(train_peak, eval_peak) > hw.gpu_memory_gb:
        notes.append(
            f"the estimated peak ({max(train_peak, eval_peak):.1f} GB) exceeds hardware.gpu_memory_gb="
            f"{hw.gpu_memory_gb:g}: use training.group_by = 'width_architecture' or 'sae', or a smaller "
            "data.buffer_contexts"
        )
    if cfg.tl_model_name == "gemma-2-2b":
        notes.append("SAEBench documents a peak of 22-24 GB for its evals on Gemma-2-2B at its batch sizes")
    return Estimate(
        train_peak_gb=train_peak, train_breakdown_gb=train_breakdown, eval_peak_gb=eval_peak,
        eval_breakdown_gb=eval_breakdown, group_hours=group_hours, group_memory_gb=group_mem,
        eval_hours=eval_hours,
        pending_train_hours=cache_hours + sum(h for g, h in group_hours.items() if not plan.group_done(g)),
        pending_eval_hours=sum(eval_hours.values()), notes=notes,
    )


def _hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.0f} min"
    return f"{h:.1f} h"


def format_plan(plan: Plan, est: Estimate, pending_evals: dict[str, int]) -> str:
    cfg = plan.cfg
    t = cfg.training
    lines = [
        f"Benchmark: {cfg.model.name} ({cfg.tl_model_name}), {cfg.model.submodule} -> {cfg.hook_name}",
        f"  run folder: {plan.run_dir}   device: {cfg.device}   config: {cfg.source or '(built-in defaults)'}",
        f"  training: {t.tokens:,} tokens from {cfg.data.dataset} = {t.steps:,} steps of {t.batch_size}, "
        f"lr {t.lr:g}, ctx {cfg.data.ctx_len}, normalize_activations={t.normalize_activations}",
        f"  baselines: {t.baselines}",
        "",
        "Training groups (SAEs in a group share one activation stream"
        + (f"; spread over {t.nproc} GPUs, memory per GPU):" if t.nproc > 1 else "):"),
    ]
    for g, specs in plan.groups.items():
        status = "done" if plan.group_done(g) else ("after the lr sweep" if plan.waits_for_sweep(g) else "to train")
        lines.append(f"  {g:<28} {len(specs):>2} SAEs  ~{est.group_memory_gb[g]:6.1f} GB for SAEs + Adam  "
                     f"~{_hours(est.group_hours[g]):>7}  [{status}]")
        lines.append("      " + ", ".join(s.name for s in specs))
    other = [s for s in plan.saes if s.source != "train"]
    if other:
        lines.append("SAEs evaluated without training:")
        for s in other:
            lines.append(f"  {s.name:<40} {s.location}")
    lines += ["", f"Evals ({', '.join(cfg.evals.evals)}) still to run per eval: "
              + ", ".join(f"{ev} {n}" for ev, n in pending_evals.items())]
    lines += [
        "",
        "Estimated GPU memory:",
        f"  training peak ~{est.train_peak_gb:.1f} GB = "
        + " + ".join(f"{k} {v:.1f}" for k, v in est.train_breakdown_gb.items()),
        f"  evals peak    ~{est.eval_peak_gb:.1f} GB = "
        + " + ".join(f"{k} {v:.1f}" for k, v in est.eval_breakdown_gb.items()),
        f"Estimated time still to run (assumes {cfg.hardware.lm_tflops:g} TFLOP/s for the LM and "
        f"{cfg.hardware.sae_tflops:g} TFLOP/s for SAE training; evals from SAEBench's documented runtimes):",
        f"  training ~{_hours(est.pending_train_hours)}, evals ~{_hours(est.pending_eval_hours)} ("
        + ", ".join(f"{ev} {_hours(h)}" for ev, h in est.eval_hours.items()) + f"), total ~{_hours(est.total_hours)}",
    ]
    lines += [f"Note: {n}" for n in est.notes]
    return "\n".join(lines)


def plan_summary(plan: Plan, est: Estimate) -> dict[str, Any]:
    return {
        "config": plan.cfg.to_dict(),
        "saes": [asdict(s) for s in plan.saes],
        "estimate": {**asdict(est), "total_hours": est.total_hours},
    }
