"""The run loop: check everything, skip finished results, load the model once, run each
(SAE, eval) pair through its runner."""

from __future__ import annotations

import operator
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from .configs import (
    EVAL_NAMES,
    MODEL_FREE_EVALS,
    SEEDED_EVALS,
    EvalConfig,
    check_eval_names,
    default_llm_settings,
    make_eval_config,
)
from ..errors import SAEBenchError
from .patches import grad_mode_restored, model_and_datasets, tokenizer_restored
from .references import SAERef, check_saes, describe_sae, load_sae, named_sources, prepare_sae
from .results import EvalRecord, SAEBenchRun, outcome_paths, read_result, seed_dir
from .runners import RUNNERS, EvalDirs


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

    # SAEBench's own call in every eval module.
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


def _check_seeds(seeds: Sequence[int] | None) -> list[int] | None:
    if seeds is None:
        return None
    if isinstance(seeds, (int, str)):
        raise SAEBenchError(f"seeds= takes a list of integers, got {seeds!r}")
    try:
        out = [operator.index(s) for s in seeds if not isinstance(s, bool)]
    except TypeError:
        out = []
    if not out or len(out) != len(list(seeds)) or any(s < 0 for s in out):
        raise SAEBenchError(f"seeds= must be a non-empty list of non-negative integers, got {list(seeds)!r}")
    if len(set(out)) != len(out):
        raise SAEBenchError(f"seeds= repeats a seed: {out!r}")
    return out


def _staging_dir(output_dir: Path) -> Path:
    """This process' staging folder under ``output_dir``. One per process, so that runs sharing an
    output folder (say, one per GPU) never delete each other's staged results; the folders of runs
    that died (their process is gone) are removed."""
    for old in output_dir.glob(".staging-*"):
        pid = old.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return output_dir / f".staging-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


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
    seeds: Sequence[int] | None = None,
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
            ``("saelens", release, sae_id)``) or a SAELens ``SAE``. Names default to folder names;
            they become file and folder names, so each must start with a letter or digit and use
            only letters, digits and ``_ . + -`` (anything else raises before a file is touched).
        output_dir: results go to ``<output_dir>/<eval>/<name>_custom_sae_eval_results.json``
            (SAEBench's own file names), exported SAEs to ``<output_dir>/saelens/<name>``.
        evals: any of :data:`EVAL_NAMES` (``"core", "absorption", "sparse_probing",
            "sparse_probing_sae_probes", "scr", "tpp", "meta_structure"``). ``meta_structure``
            needs no language model: a run of it alone loads none.
        model_name: the TransformerLens model name; default: the one all SAEs record. A mismatch
            with any SAE raises before anything is loaded.
        hook_name: when given, every SAE must be trained on this hook.
        device: default ``"cuda"`` when available, else ``"cpu"``.
        llm_dtype, llm_batch_size: default SAEBench's values for the model
            (``gemma-2-2b``: bfloat16, 32; unknown models: float32, 32).
        random_seed: every eval's seed (with ``seeds``: core's only).
        seeds: run the evals that sample (:data:`SEEDED_EVALS`: absorption's vocabulary split,
            the probing evals' train/test splits, the meta-SAE) once per seed; their results go
            to ``<output_dir>/seed_<seed>/<eval>/...`` and :meth:`SAEBenchRun.rows` gives the mean
            and standard deviation over seeds (:meth:`SAEBenchRun.seed_results`: every seed's
            results). Core runs once (``random_seed``). Finished seeds are skipped like any other
            result.
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
    refs = [describe_sae(src, name) for name, src in named_sources(saes)]
    model_name = check_saes(refs, model_name=model_name, hook_name=hook_name, evals=evals)
    default_bs, default_dtype = default_llm_settings(model_name)
    llm_batch_size = int(llm_batch_size or default_bs)
    llm_dtype = llm_dtype or default_dtype
    from sae_bench.sae_bench_utils.general_utils import str_to_dtype

    try:
        str_to_dtype(llm_dtype)
    except ValueError as e:
        raise SAEBenchError(str(e)) from None
    seed_list = _check_seeds(seeds)
    # (eval, seed, folder) for every result each SAE gets
    plan: list[tuple[str, int, Path]] = []
    output_dir = Path(output_dir).resolve()
    for ev in evals:
        if seed_list is not None and ev in SEEDED_EVALS:
            plan += [(ev, s, seed_dir(output_dir, s)) for s in seed_list]
        else:
            plan.append((ev, random_seed, output_dir))
    configs: dict[tuple[str, int], EvalConfig] = {}
    for ev, seed, _ in plan:
        if (ev, seed) not in configs:
            configs[ev, seed] = make_eval_config(ev, model_name, llm_batch_size=llm_batch_size, llm_dtype=llm_dtype,
                                                 random_seed=seed, overrides=overrides.get(ev))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    artifacts_dir = Path(artifacts_dir).resolve() if artifacts_dir is not None else output_dir / "artifacts"
    staging = _staging_dir(output_dir)
    if model is not None:
        _check_model(model, model_name, refs, llm_dtype)

    run = SAEBenchRun(output_dir, model_name, [], evals, seeds=None if seed_list is None else tuple(seed_list))
    todo: list[tuple[SAERef, list[tuple[str, int, Path]]]] = []
    for ref in refs:
        pending = []
        for ev, seed, where in plan:
            existing = None if force else read_result(where, ref.name, ev)
            if existing is not None:
                run.records.append(EvalRecord(ref.name, ev, "skipped", existing["path"], metrics=existing["metrics"],
                                              reason=existing.get("reason"), seed=seed))
            else:
                pending.append((ev, seed, where))
        todo.append((ref, pending))

    # Export the trainer folders that still have evals to run (surfaces unusable checkpoints, e.g. a
    # BatchTopK SAE without an inference threshold, before the model is loaded).
    prepared = [prepare_sae(ref, output_dir / "saelens") if pending else ref for ref, pending in todo]
    run.saes = prepared
    n_jobs = sum(len(p) for _, p in todo)
    if n_jobs == 0:
        return run
    needs_model = any(ev not in MODEL_FREE_EVALS for _, pending in todo for ev, _, _ in pending)
    if model is None and needs_model:
        model = _load_model(model_name, device, llm_dtype)
        _check_model(model, model_name, refs, llm_dtype)

    from tqdm.auto import tqdm

    bar = tqdm(total=n_jobs, desc="SAEBench", disable=not progress)
    try:
        with model_and_datasets(model, model_name, load_dataset):
            for (ref, pending), prep in zip(todo, prepared):
                if not pending:
                    continue
                sae = load_sae(prep, device=device)
                for ev, seed, where in pending:
                    bar.set_postfix_str(f"{ref.name}: {ev}" + (f" (seed {seed})" if seed_list is not None else ""))
                    cfg = configs[ev, seed]
                    dirs = EvalDirs(where, staging, artifacts_dir / ev / cfg.cache_key())
                    t0 = time.time()
                    for stale in outcome_paths(where, ref.name, ev):
                        stale.unlink(missing_ok=True)  # force=True: never leave an old outcome beside a new one
                    _seed_everything(seed)
                    with grad_mode_restored(), tokenizer_restored(model):
                        rec = RUNNERS[ev](cfg, ref.name, sae, device, dirs)
                    rec.seconds = time.time() - t0
                    rec.seed = seed
                    got = read_result(where, ref.name, ev)
                    rec.metrics = got["metrics"] if got else {}
                    run.records.append(rec)
                    bar.update(1)
                del sae
    finally:
        bar.close()
        shutil.rmtree(staging, ignore_errors=True)
    return run
