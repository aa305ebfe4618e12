"""Every change this package makes to SAEBench's behaviour, in one place, each undone on exit.

SAEBench's evals load their own model, read hub data sets, write caches relative to the working
directory or its installed package, swallow core-eval exceptions and switch gradients off
globally. The context managers here replace the module attributes involved (or guard the global
state) for the duration of one run or one eval. Run one ``run_saebench`` at a time per process:
the replacements are process-wide.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..errors import SAEBenchError

# The eval modules that call HookedTransformer.from_pretrained_no_processing themselves.
_EVAL_MODULES = (
    "sae_bench.evals.absorption.main",
    "sae_bench.evals.sparse_probing.main",
    "sae_bench.evals.scr_and_tpp.main",
    "sae_bench.evals.core.main",
    # sparse_probing_sae_probes: the sae-probes package loads the model (without a dtype) when
    # its cached activations are missing
    "sae_probes.generate_model_activations",
)
# The modules that read hub data sets with their own reference to datasets.load_dataset (the core
# eval reads its text through SAELens' ActivationsStore).
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


class _ProvidedModel:
    """Stands in for ``HookedTransformer`` inside SAEBench's eval modules: ``from_pretrained_no_processing``
    returns the model this run already holds instead of loading one."""

    def __init__(self, model: Any, model_name: str):
        self.model = model
        self.model_name = model_name

    def from_pretrained_no_processing(self, model_name: str, *args: Any, **kwargs: Any) -> Any:
        if self.model is None:
            raise SAEBenchError(f"SAEBench asked for model {model_name!r} in an eval the run holds no model for")
        if model_name != self.model_name:
            raise SAEBenchError(f"SAEBench asked for model {model_name!r} but this run evaluates {self.model_name!r}")
        dtype = kwargs.get("dtype")
        if dtype is not None and dtype != self.model.cfg.dtype:
            raise SAEBenchError(
                f"SAEBench asked for {model_name} in {dtype}, the run holds it in {self.model.cfg.dtype}"
            )
        return self.model

    from_pretrained = from_pretrained_no_processing


@contextlib.contextmanager
def model_and_datasets(model: Any, model_name: str, load_dataset: Callable[..., Any] | None) -> Iterator[None]:
    """Every eval uses ``model`` instead of loading its own copy (each eval would load the language
    model again), and reads its data sets through ``load_dataset`` when given (local data, offline)."""
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
def absorption_in(artifacts: Path) -> Iterator[Path]:
    """Absorption's caches go under ``artifacts`` instead of SAEBench's installed package: its
    ``run_eval`` does not pass folders to its two experiments, so they are replaced by the same
    functions with folders bound; and it writes its k-sparse-probing summary to the relative path
    ``artifacts/absorption/``, so it runs in ``artifacts/cwd``. Yields that working directory."""
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
    cwd = artifacts / "cwd"
    with contextlib.ExitStack() as stack:
        stack.enter_context(_replaced(absorption_main, "run_k_sparse_probing_experiment", k_sparse))
        stack.enter_context(_replaced(absorption_main, "run_feature_absortion_experiment", feature))
        stack.enter_context(_working_directory(cwd))
        yield cwd


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def core_errors_logged() -> Iterator[list[str]]:
    """The error messages SAEBench's core eval logs: ``multiple_evals`` catches an SAE's exception,
    logs it and moves on, so the caller needs them to raise instead. Yields the list they fill."""
    import sae_bench.evals.core.main as core

    capture = _LogCapture()
    core.logger.addHandler(capture)
    try:
        yield capture.messages
    finally:
        core.logger.removeHandler(capture)


@contextlib.contextmanager
def tokenizer_restored(model: Any) -> Iterator[None]:
    """The shared model's tokenizer sides as they were before: sae-probes sets
    ``truncation_side="left"`` and ``padding_side="right"`` on the model's tokenizer (it expects a
    model of its own), which would change how the evals after it tokenize."""
    tok = getattr(model, "tokenizer", None)
    sides = {a: getattr(tok, a) for a in ("truncation_side", "padding_side") if hasattr(tok, a)}
    try:
        yield
    finally:
        for attr, value in sides.items():
            setattr(tok, attr, value)


@contextlib.contextmanager
def grad_mode_restored() -> Iterator[None]:
    """Torch's grad mode as it was before: SAEBench's SCR/TPP turn gradients off globally."""
    was = torch.is_grad_enabled()
    try:
        yield
    finally:
        torch.set_grad_enabled(was)
