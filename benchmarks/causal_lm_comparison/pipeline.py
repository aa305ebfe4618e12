"""Train, evaluate, report: the comparison's one command.

    run_benchmark(load_config("smollm2_135m"))   # or "gemma2_2b_l12", "tiny", a .toml file

1. Check the config and every existing result against it (nothing is loaded yet), print the plan
   and the GPU memory / time estimates.
2. Build (or finish) the activation cache once (``activations.py``: the training and held-out
   splits, in resumable shards, under ``data.cache_dir``), then train each pending group of SAEs
   with :func:`matryoshka_plugin.train` (trainSAE's loop with full-state checkpoints) on the cached
   activations, the same batches in the same order for every SAE. A group is written to
   ``train/.<group>.partial`` and renamed to ``train/<group>`` when every SAE of it is saved; an
   interrupted group resumes from its newest checkpoint (every ``training.checkpoint_every`` steps)
   and finished groups are skipped. With ``training.nproc = N`` (``--nproc N``, under torchrun) the
   SAEs of a group are spread over N GPUs.
3. Run the SAEBench evals on every SAE with :func:`matryoshka_plugin.saebench.run_saebench`
   (results that exist are skipped).
4. Write ``report/comparison.md``, ``report/comparison.csv`` and ``report/<metric>_vs_l0.png``.

Where the model and data come from is injectable: ``models`` (an object with
``language_model(cfg)`` -> nnsight ``LanguageModel`` and ``hooked_transformer(cfg)`` ->
TransformerLens ``HookedTransformer`` or None) and ``load_dataset`` (``datasets.load_dataset``'s
signature, used for the training text and by SAEBench). The defaults follow the config:
:class:`ConfiguredModels` loads ``model.source`` (a hub id, a folder or a GGUF file) through
:func:`matryoshka_plugin.language_model.load_language_model`, and ``data.dataset = "sae-probes"``
reads sae-probes' shipped texts (``text.py``); any other data set is streamed from the hub.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .config import SAE_PROBES_TEXT, BenchmarkConfig, ConfigError
from .plan import (
    Estimate,
    Plan,
    SAESpec,
    build_plan,
    check_group_folder,
    estimate,
    format_plan,
    group_spec,
    plan_summary,
    trainer_config,
)
from .report import console_table, write_report

__all__ = ["ConfiguredModels", "BenchmarkResult", "default_load_dataset", "run_benchmark", "prepare",
           "prepare_activations", "text_stream"]

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _layers_needed(cfg: BenchmarkConfig) -> int | None:
    """Decoder layers the training must run to read ``model.submodule`` (None: all of them)."""
    import re

    m = re.match(r"^(?:model\.layers|transformer\.h|gpt_neox\.layers)\.(\d+)(?:\.|$)", cfg.model.submodule)
    return int(m.group(1)) + 1 if m and cfg.model.truncate else None


class ConfiguredModels:
    """The models the config names: ``model.source`` (None: the hub id ``model.name``; a local
    folder; a GGUF file; ``package:PKG/FILE``), loaded by
    :func:`matryoshka_plugin.language_model.load_language_model`. Training gets the layers up to
    ``model.layer`` only (``model.truncate``); the evals get SAEBench's own TransformerLens model
    (``model.hooked_transformer = "official"``, from the hub) or one converted from the full
    weights (``"convert"``, Llama family). ``google/gemma-2-2b`` is gated on the hub: accept its
    licence on huggingface.co and log in (``huggingface-cli login`` or ``HF_TOKEN``) first."""

    def _spec(self, cfg: BenchmarkConfig, dtype: str, n_layers: int | None):
        from matryoshka_plugin.language_model import LanguageModelSpec

        m = cfg.model
        return LanguageModelSpec(source=m.source or m.name, gguf_file=m.gguf_file, dtype=dtype, device=cfg.device,
                                 n_layers=n_layers, add_bos_token=m.add_bos_token)

    def language_model(self, cfg: BenchmarkConfig):
        from nnsight import LanguageModel

        from matryoshka_plugin.language_model import LanguageModelError, load_language_model

        try:
            model, tokenizer = load_language_model(self._spec(cfg, cfg.model.dtype, _layers_needed(cfg)))
        except LanguageModelError as e:
            raise ConfigError(f"model: {e}") from None
        tokenizer.padding_side = "right"
        return LanguageModel(model, tokenizer=tokenizer)

    def fingerprint(self, cfg: BenchmarkConfig) -> str:
        """The model source's fingerprint for the activation cache, without loading it: sha256 of
        the file (GGUF, package file) or of a local folder's files; a hub id is named as it is."""
        import hashlib

        from matryoshka_plugin.language_model import LanguageModelError, resolve_source

        m = cfg.model
        try:
            location, gguf, local = resolve_source(m.source or m.name, m.gguf_file)
        except LanguageModelError as e:
            raise ConfigError(f"model: {e}") from None
        if not local:
            return f"hub:{location}"
        path = Path(location)
        files = [path / gguf] if gguf else ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()))
        h = hashlib.sha256()
        for f in files:
            h.update(str(f.relative_to(path) if f != path else f.name).encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
        return "sha256:" + h.hexdigest()

    def hooked_transformer(self, cfg: BenchmarkConfig):
        if cfg.model.hooked_transformer == "official":
            return None  # run_saebench loads it with SAEBench's own call
        from matryoshka_plugin.language_model import (
            LanguageModelError,
            hooked_transformer_from_hf,
            load_language_model,
        )
        from matryoshka_plugin.saebench import default_llm_settings

        dtype = cfg.evals.llm_dtype or default_llm_settings(cfg.tl_model_name)[1]
        try:
            model, tokenizer = load_language_model(self._spec(cfg, dtype, None))
            return hooked_transformer_from_hf(model, tokenizer, model_name=cfg.tl_model_name, n_ctx=cfg.model.n_ctx)
        except LanguageModelError as e:
            raise ConfigError(f"model: {e}") from None


def default_load_dataset(cfg: BenchmarkConfig) -> Callable[..., Any] | None:
    """``load_dataset`` for the config: sae-probes' texts served locally when ``data.dataset`` is
    ``"sae-probes"`` (every other name from the hub); None (``datasets.load_dataset``) otherwise."""
    if cfg.data.dataset != SAE_PROBES_TEXT:
        return None
    from .text import local_load_dataset

    d = cfg.data
    return local_load_dataset(exclude=cfg.probing_datasets if d.exclude_probing_texts else (),
                              heldout_every=d.heldout_every, seed=0)


@dataclass
class BenchmarkResult:
    plan: Plan
    estimate: Estimate
    rows: list[dict[str, Any]] = field(default_factory=list)
    report_files: list[Path] = field(default_factory=list)
    trained_groups: list[str] = field(default_factory=list)
    eval_records: list[Any] = field(default_factory=list)


def _json_dump_atomic(path: Path, obj: Any) -> None:
    from matryoshka_plugin.io import atomic_write_json  # lazy, like the other package imports here

    atomic_write_json(obj, path, default=str)


def _resolved_eval_settings(cfg: BenchmarkConfig) -> dict[str, Any]:
    from matryoshka_plugin.saebench import default_llm_settings, make_eval_config

    bs, dtype = default_llm_settings(cfg.tl_model_name)
    e = cfg.evals
    out = {}
    for ev in e.evals:
        c = make_eval_config(ev, cfg.tl_model_name, llm_batch_size=e.llm_batch_size or bs,
                             llm_dtype=e.llm_dtype or dtype, random_seed=e.random_seed, overrides=e.overrides.get(ev))
        batch_sizes = ("llm_batch_size", "sae_batch_size", "eval_batch_size_prompts")
        out[ev] = {k: v for k, v in c.to_dict().items() if k not in batch_sizes}
        if ev == "core" and cfg.data.max_norm_ratio is not None:
            out[ev]["max_activation_norm"] = f"{cfg.data.max_norm_ratio:g} x the held-out median norm"
    return json.loads(json.dumps(out, default=str))


def eval_overrides(cfg: BenchmarkConfig) -> dict[str, dict[str, Any]]:
    """``evals.overrides`` with core's ``max_activation_norm`` set from ``data.max_norm_ratio``: core
    passes through the tokens that training left out (the cache's threshold)."""
    from .activations import cache_dir, norm_threshold

    out = {k: dict(v) for k, v in cfg.evals.overrides.items() if k in cfg.evals.evals}
    if cfg.data.max_norm_ratio is not None and "core" in cfg.evals.evals:
        out.setdefault("core", {})["max_activation_norm"] = norm_threshold(cache_dir(cfg), cfg.data.max_norm_ratio)
    return out


def _check_eval_settings(plan: Plan, force_evals: bool) -> None:
    path = plan.eval_dir / "settings.json"
    current = _resolved_eval_settings(plan.cfg)
    if path.is_file() and not force_evals:
        saved = json.loads(path.read_text())
        changed = sorted(ev for ev in current if ev in saved and saved[ev] != current[ev])
        if changed:
            raise ConfigError(
                f"the settings of eval(s) {changed} differ from those the results in {plan.eval_dir} were computed "
                "with; pass --force-evals to recompute them, or use another run_dir"
            )


def _write_eval_settings(plan: Plan) -> None:
    path = plan.eval_dir / "settings.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    saved.update(_resolved_eval_settings(plan.cfg))
    _json_dump_atomic(path, saved)


def _check_existing_saes(plan: Plan) -> None:
    """Trained groups, extra SAE folders and published SAEs must match the config's model and hook."""
    from matryoshka_plugin.saebench import SAEBenchError, check_saes, describe_sae

    cfg = plan.cfg
    refs = []
    for g in plan.groups:
        if plan.group_done(g):
            check_group_folder(plan, g)
            refs += [describe_sae(s.location, s.name) for s in plan.groups[g]]
    for s in plan.saes:
        if s.source != "train":
            try:
                refs.append(describe_sae(s.location, s.name))
            except SAEBenchError as e:
                raise ConfigError(f"SAE {s.name!r}: {e}") from None
    if refs:
        try:
            check_saes(refs, model_name=cfg.tl_model_name, hook_name=cfg.hook_name, evals=cfg.evals.evals)
        except SAEBenchError as e:
            raise ConfigError(str(e)) from None


def _pending_evals(plan: Plan, force_evals: bool) -> dict[str, int]:
    from matryoshka_plugin.saebench import SEEDED_EVALS, read_result, seed_dir

    seeds = plan.cfg.evals.seeds
    folders = {ev: [seed_dir(plan.eval_dir, x) for x in seeds] if seeds and ev in SEEDED_EVALS else [plan.eval_dir]
               for ev in plan.cfg.evals.evals}  # one result per SAE and seed
    return {ev: sum(1 for s in plan.saes if s.stage != "sweep" for f in folders[ev]
                    if force_evals or read_result(f, s.name, ev) is None)
            for ev in plan.cfg.evals.evals}


def prepare(cfg: BenchmarkConfig, force_evals: bool = False) -> tuple[Plan, Estimate, dict[str, int]]:
    """Validate, build the plan, check existing results against it and estimate; loads nothing."""
    cfg.validate()
    plan = build_plan(cfg)
    _check_existing_saes(plan)
    _check_eval_settings(plan, force_evals)
    pending = _pending_evals(plan, force_evals)
    return plan, estimate(plan, pending), pending


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def text_stream(cfg: BenchmarkConfig, load_dataset: Callable[..., Any] | None = None) -> Iterator[str]:
    """Texts of ``cfg.data.dataset`` streamed with ``datasets.load_dataset``; starts over (with a
    warning) when a finite data set runs out."""
    if load_dataset is None:
        from datasets import load_dataset
    d = cfg.data
    epoch = 0
    while True:
        ds = load_dataset(d.dataset, split=d.split, streaming=True)
        n = 0
        for row in ds:
            if d.text_column not in row:
                raise ConfigError(f"{d.dataset} has no column {d.text_column!r} (columns: {sorted(row)})")
            text = row[d.text_column]
            if isinstance(text, str) and text.strip():
                n += 1
                yield text
        if n == 0:
            raise ConfigError(f"{d.dataset} ({d.split}) yielded no text")
        epoch += 1
        if epoch == 1:
            warnings.warn(f"{d.dataset} ran out after {n} texts; starting over", stacklevel=2)


def resolve_submodule(lm: Any, path: str) -> Any:
    obj = lm
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def prepare_activations(cfg: BenchmarkConfig, models: Any, load_dataset: Callable[..., Any] | None,
                        log: Callable[[str], None] = print, progress: bool = True, **kwargs: Any) -> Path:
    """Build (or finish) the configuration's activation cache (``activations.py``): the training
    split (``training.tokens``) and the held-out split (``data.heldout_tokens``). The model is
    loaded only if a shard is missing. Returns the cache folder."""
    from .activations import build_cache, cache_dir, weights_fingerprint

    if hasattr(models, "fingerprint"):
        fingerprint = models.fingerprint(cfg)
    else:  # a model handed in: hash the weights it runs
        def fingerprint(lm: Any) -> str:
            return weights_fingerprint(getattr(lm, "_model", lm), getattr(lm, "tokenizer", None))

    t0 = time.time()
    build_cache(cfg, lambda: models.language_model(cfg), fingerprint, load_dataset=load_dataset, log=log,
                progress=progress, **kwargs)
    log(f"[activations] ready in {cache_dir(cfg)} ({time.time() - t0:.0f} s)")
    return cache_dir(cfg)


def train_group(plan: Plan, group: str, cache: Path | None, log: Callable[[str], None]) -> None:
    """Train one group with ``matryoshka_plugin.train`` in ``train/.<group>.partial`` on the cached
    activations (the same batches in the same order for every SAE), resuming from its newest
    full-state checkpoint; with ``training.nproc > 1`` (under torchrun) the group's SAEs are spread
    over the ranks and rank 0 reads the cache (``cache`` is None elsewhere)."""
    from matryoshka_plugin import reuse_host_memory, train

    from .activations import CachedActivations, norm_threshold

    cfg = plan.cfg
    specs = plan.groups[group]
    final = plan.group_dir(group)
    partial = final.with_name(f".{group}.partial")
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        if not (partial / "resume").is_dir():
            shutil.rmtree(partial, ignore_errors=True)  # nothing to resume from: start afresh
        else:
            log(f"resuming {group} from {partial / 'resume'}")
        if final.exists():
            shutil.rmtree(final)  # incomplete (no group.json or a missing ae.pt)
        partial.mkdir(parents=True, exist_ok=True)
    t = cfg.training
    configs = [trainer_config(cfg, s) for s in specs]
    steps = configs[0]["steps"]  # the sweep's groups may be shorter
    source = None
    if cache is not None:
        source = CachedActivations(cache, t.batch_size, device=cfg.device, n_batches=steps,
                                   max_norm=norm_threshold(cache, cfg.data.max_norm_ratio))
    if torch.device(cfg.device).type == "cpu":
        reuse_host_memory()  # faster CPU steps for the whole process (docs/speed.md, "Host memory")
    train(source, configs, steps, save_dir=str(partial), normalize_activations=t.normalize_activations,
          device=cfg.device, autocast_dtype=_TORCH_DTYPES[t.autocast_dtype], checkpoint_every=t.checkpoint_every,
          resume=True, distributed="trainers" if t.nproc > 1 else None)
    if not main:
        return
    for s in specs:
        if not (partial / f"trainer_{s.index}" / "ae.pt").is_file():
            raise RuntimeError(f"trainSAE finished without writing {partial}/trainer_{s.index}/ae.pt")
    _json_dump_atomic(partial / "group.json", group_spec(cfg, specs))
    shutil.rmtree(partial / "resume", ignore_errors=True)  # the group is done: its full states are not needed
    os.replace(partial, final)
    # Results of earlier SAEs with these names are stale now.
    from matryoshka_plugin.saebench import remove_results

    for s in specs:
        for path in remove_results(plan.eval_dir, s.name):
            log(f"removed stale result {path}")


@torch.no_grad()
def heldout_metrics(folder: str | Path, acts: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """FVU (``sum |x - x_hat|^2 / sum |x - mean|^2``), mean L0 and the fraction of latents that
    never fire, of the SAE in ``folder`` on the held-out activations ``acts``."""
    from matryoshka_plugin import load_dictionary

    ae, _ = load_dictionary(folder, device="cpu")
    ae.eval()
    err = l0 = 0.0
    fired = None
    for s in range(0, acts.shape[0], batch_size):
        x = acts[s : s + batch_size]
        x_hat, f = ae(x, output_features=True)
        err += float(((x - x_hat) ** 2).sum())
        active = f != 0
        l0 += float(active.sum())
        fired = active.any(0) if fired is None else fired | active.any(0)
    total = float(((acts - acts.mean(0)) ** 2).sum())
    return {"fvu": err / total, "l0": l0 / acts.shape[0], "dead": 1.0 - float(fired.float().mean())}


def heldout_activations(cfg: BenchmarkConfig, cache: Path) -> torch.Tensor:
    """The held-out activations the metrics read: ``data.heldout_tokens`` of the cache's held-out
    split, without the tokens above the norm limit."""
    from .activations import load_split, norm_threshold

    return load_split(cache, "heldout", cfg.data.heldout_tokens, max_norm=norm_threshold(cache, cfg.data.max_norm_ratio))


def heldout_results(plan: Plan, specs: list[SAESpec], log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """:func:`heldout_metrics` of each SAE on the cache's held-out split (tokens above the norm
    limit left out), kept in ``<run_dir>/heldout/<name>.json`` and recomputed when the SAE's
    weights are newer."""
    from .activations import cache_dir

    out: dict[str, dict[str, float]] = {}
    acts = None
    folder = plan.run_dir / "heldout"
    for s in specs:
        path = folder / f"{s.name}.json"
        weights = Path(s.location) / "ae.pt"
        if path.is_file() and weights.is_file() and path.stat().st_mtime >= weights.stat().st_mtime:
            out[s.name] = json.loads(path.read_text())
            continue
        if acts is None:
            acts = heldout_activations(plan.cfg, cache_dir(plan.cfg))
            log(f"held-out metrics on {acts.shape[0]:,} tokens")
        out[s.name] = heldout_metrics(s.location, acts)
        _json_dump_atomic(path, out[s.name])
    return out


def write_sweep_result(plan: Plan, cache: Path, log: Callable[[str], None] = print,
                       retrained: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluate the lr sweep's SAEs on the held-out activations and write ``lr_sweep.json``: per
    architecture each lr's FVU, L0 and dead fraction, and the lr of the lowest FVU (chosen). The
    entries of an existing file made with the same sweep settings are kept, except for the groups
    in ``retrained`` (a run of some architectures, or a sweep group retrained, updates only its own)."""
    from .activations import norm_threshold

    t = plan.cfg.training
    acts = heldout_activations(plan.cfg, cache)
    out: dict[str, Any] = {"lrs": [float(x) for x in t.lr_sweep], "l0": t.lr_sweep_l0,
                           "heldout_tokens": int(acts.shape[0]), "max_norm_ratio": plan.cfg.data.max_norm_ratio,
                           "max_norm": norm_threshold(cache, plan.cfg.data.max_norm_ratio), "steps": t.sweep_steps,
                           "architectures": {}}
    old = json.loads(plan.sweep_file.read_text()) if plan.sweep_file.is_file() else None
    if old is not None and all(old.get(k) == out[k] for k in ("lrs", "l0", "max_norm_ratio", "steps")):
        out["architectures"] = dict(old.get("architectures", {}))
    for group in plan.sweep_groups:
        if group not in retrained and plan.groups[group][0].architecture in out["architectures"]:
            continue
        specs = plan.groups[group]
        results = {s.name: {"lr": s.lr, **heldout_metrics(s.location, acts)} for s in specs}
        best = min(results.values(), key=lambda r: r["fvu"])
        out["architectures"][specs[0].architecture] = {"chosen_lr": best["lr"], "results": results}
        log(f"[lr sweep] {specs[0].architecture}: " + ", ".join(
            f"lr {r['lr']:g} FVU {r['fvu']:.4f} L0 {r['l0']:.1f} dead {r['dead']:.1%}" for r in results.values())
            + f" -> lr {best['lr']:g}")
    _json_dump_atomic(plan.sweep_file, out)
    return out


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def run_benchmark(
    cfg: BenchmarkConfig,
    *,
    models: Any = None,
    load_dataset: Callable[..., Any] | None = None,
    dry_run: bool = False,
    skip_training: bool = False,
    skip_evals: bool = False,
    force_evals: bool = False,
    sweep_only: bool = False,
    log: Callable[[str], None] = print,
) -> BenchmarkResult:
    """Run (or with ``dry_run`` only plan) the benchmark; see the module docstring."""
    if int(os.environ.get("RANK", "0")) != 0:
        log = lambda _line: None  # noqa: E731 - rank 0 speaks for the run
    plan, est, pending = prepare(cfg, force_evals=force_evals)
    log(format_plan(plan, est, pending))
    result = BenchmarkResult(plan, est)
    if dry_run:
        return result
    models = models if models is not None else ConfiguredModels()
    if load_dataset is None:
        load_dataset = default_load_dataset(cfg)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    _json_dump_atomic(plan.run_dir / "plan.json", plan_summary(plan, est))

    todo = [] if skip_training else plan.pending_groups()
    rank = int(os.environ.get("RANK", "0"))
    if cfg.training.nproc > 1 and todo:
        from matryoshka_plugin.distributed import setup

        world = setup("trainers")  # one process group for every group's training
        if world.world_size != cfg.training.nproc:
            raise ConfigError(f"training.nproc = {cfg.training.nproc} but {world.world_size} processes were started")
    if rank != 0:
        # The other ranks only train their share of each group; rank 0 evaluates and reports.
        for group in todo:
            train_group(plan, group, None, log)
        return result
    if todo:
        cache = prepare_activations(cfg, models, load_dataset, log)
        _release_memory()  # the language model, if the cache needed it

        def train_groups(groups: list[str], stage: str) -> None:
            for i, group in enumerate(groups, 1):
                t0 = time.time()
                log(f"[{stage} {i}/{len(groups)}] {group}: {', '.join(s.name for s in plan.groups[group])}")
                train_group(plan, group, cache, log)
                _release_memory()
                result.trained_groups.append(group)
                log(f"[{stage} {i}/{len(groups)}] {group} done in {(time.time() - t0) / 60:.1f} min")

        # The lr sweep first (if any), then the SAEs at the chosen lrs.
        swept = [g for g in todo if g in plan.sweep_groups]
        train_groups(swept, "lr sweep")
        if plan.sweep_groups and (swept or not plan.sweep_file.is_file()):
            write_sweep_result(plan, cache, log, swept)
            plan = result.plan = build_plan(cfg)
        if not sweep_only:
            train_groups([g for g in plan.pending_groups() if g not in plan.sweep_groups], "train")
    if sweep_only:
        return result

    available = [s for s in plan.saes if s.stage != "sweep" and (s.source != "train" or plan.group_done(s.group))]
    missing = [s.name for s in plan.saes if s not in available and s.stage != "sweep"]
    if missing:
        log(f"not trained yet (skipped in evals and report): {', '.join(missing)}")
    if not skip_evals and available:
        from matryoshka_plugin.saebench import run_saebench

        e = cfg.evals
        _write_eval_settings(plan)
        run = run_saebench(
            {s.name: s.location for s in available}, plan.eval_dir, e.evals,
            model_name=cfg.tl_model_name, hook_name=cfg.hook_name, device=cfg.device, llm_dtype=e.llm_dtype,
            llm_batch_size=e.llm_batch_size, random_seed=e.random_seed, seeds=e.seeds, eval_overrides=eval_overrides(cfg),
            model=models.hooked_transformer(cfg), load_dataset=load_dataset, force=force_evals,
        )
        result.eval_records = run.records
        for r in run.records:
            if r.status == "not_evaluated":
                log(f"note: {r.name} {r.eval}: {r.reason}")
    heldout = heldout_results(plan, [s for s in available if s.source == "train"], log)
    result.rows, result.report_files = write_report(plan, available, heldout)
    if cfg.publish_dir:
        write_report(plan, available, heldout, out=cfg.publish_dir)
        log(f"published the report to {cfg.publish_dir}")
    if result.rows:
        log("\n" + console_table(result.rows, cfg.evals.evals))
    log(f"report: {', '.join(str(p) for p in result.report_files[:3])} and {len(result.report_files) - 3} plots")
    return result
