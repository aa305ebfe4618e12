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
import inspect
import logging
import os
import random
import re
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


# The absorption modules that read the tokenizer's alphabetic tokens with their own reference to
# sae_bench.evals.absorption.vocab.get_alpha_tokens: the probe's training/test words, and the
# in-context examples of the absorption prompts.
_ABSORPTION_VOCAB_MODULES = ("sae_bench.evals.absorption.common", "sae_bench.evals.absorption.feature_absorption")


MIN_WORDS_PER_LETTER = 10
"""Words of every first letter in a sampled vocabulary: SAEBench trains a k-sparse probe for each
letter of the probe's training words and then looks one up for every letter of the alphabet (a
letter without training words raises KeyError); with 10, its 80/20 split leaves a letter without
training words with probability 0.2^10."""


def sampled_alpha_tokens(get_alpha_tokens: Callable[..., list[str]], size: int, seed: int) -> Callable[..., list[str]]:
    """``get_alpha_tokens`` returning ``size`` of its words, drawn with ``seed`` from their sorted list
    (the same words on every call, whatever order the tokenizer's vocabulary comes in):
    :data:`MIN_WORDS_PER_LETTER` of every first letter (all of a rarer letter's), the rest
    uniformly from the remaining words."""

    def sampled(tokenizer: Any, *args: Any, **kwargs: Any) -> list[str]:
        words = sorted(get_alpha_tokens(tokenizer, *args, **kwargs))
        if len(words) <= size:
            return words
        rng = random.Random(seed)
        by_letter: dict[str, list[str]] = {}
        for w in words:
            by_letter.setdefault(w.strip()[0].lower(), []).append(w)
        chosen = [w for group in by_letter.values() for w in rng.sample(group, min(len(group), MIN_WORDS_PER_LETTER))]
        taken = set(chosen)
        rest = [w for w in words if w not in taken]
        chosen += rng.sample(rest, max(0, size - len(chosen)))
        return rng.sample(chosen, len(chosen))

    return sampled


@contextlib.contextmanager
def absorption_vocabulary(size: int | None, seed: int) -> Iterator[None]:
    """Absorption draws its words from ``size`` of the tokenizer's alphabetic tokens (None: all of
    them, SAEBench's behaviour). SAEBench trains its first-letter probe on a prompt of about 90
    tokens for every alphabetic token of the vocabulary through the whole model; a sample keeps
    that one-off pass CPU-sized. The probe's 80/20 word split and everything after it are
    SAEBench's own."""
    if size is None:
        yield
        return
    from sae_bench.evals.absorption.vocab import get_alpha_tokens

    sampled = sampled_alpha_tokens(get_alpha_tokens, int(size), int(seed))
    with contextlib.ExitStack() as stack:
        for mod_name in _ABSORPTION_VOCAB_MODULES:
            stack.enter_context(_replaced(importlib.import_module(mod_name), "get_alpha_tokens", sampled))
        yield


@contextlib.contextmanager
def float32_probe_inputs() -> Iterator[None]:
    """sae-probes stores the model's activations in the model's dtype and hands them to
    scikit-learn's probes as they are, which cannot read bfloat16 (``TypeError: Got unsupported
    ScalarType BFloat16``); its SAE activations it already reads as float32. The model's
    activations are read as float32 too (``utils_data.get_xvals``)."""
    import sae_probes.utils_data as data

    original = data.get_xvals

    @functools.wraps(original)
    def get_xvals(*args: Any, **kwargs: Any) -> Any:
        x = original(*args, **kwargs)
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    with _replaced(data, "get_xvals", get_xvals):
        yield


@contextlib.contextmanager
def length_sorted_probe_texts() -> Iterator[None]:
    """sae-probes runs its datasets' texts through the model in file order, 32 at a time, each batch
    padded to its longest text (up to 1,024 tokens): a dataset with a few long texts pays for
    padding in almost every batch (``161_agnews_0`` on SmolLM2 on a CPU: 2.5 min per batch, 5 hours
    in all). The texts are handed over sorted by token length and the activations put back in file
    order. Each text's activation is that of its last token, right-padded under a causal mask, so
    the batch it shares does not change it (the test compares both orders)."""
    import sae_probes.generate_model_activations as gen

    original = gen._process_activations

    @functools.wraps(original)
    def process(model: Any, texts: list[str], *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        lengths = gen._get_text_lengths(model, texts)
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        out = original(model, [texts[i] for i in order], *args, **kwargs)
        back = torch.empty(len(order), dtype=torch.long)
        back[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        return {name: acts[back] for name, acts in out.items()}

    with _replaced(gen, "_process_activations", process):
        yield


_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.hook_")


@contextlib.contextmanager
def forward_to_hook_layer() -> Iterator[None]:
    """``HookedTransformer.run_with_cache`` stops after the last block its ``names_filter`` reads
    (``stop_at_layer``) when the caller names only ``blocks.<n>.hook_*`` points and no stop of its
    own. Absorption reads just the SAE's hook from the probe prompts, yet SAEBench runs the whole
    model and its unembedding for every one; the cached activations are the same, and the output
    (the logits, which absorption never reads) becomes the residual stream at the stop."""
    from transformer_lens import HookedTransformer

    original = HookedTransformer.run_with_cache

    @functools.wraps(original)
    def run_with_cache(self: Any, *args: Any, **kwargs: Any) -> Any:
        names = kwargs.get("names_filter")
        names = [names] if isinstance(names, str) else names
        if kwargs.get("stop_at_layer") is None and isinstance(names, (list, tuple)) and names:
            layers = [_BLOCK_HOOK.match(n) for n in names]
            if all(layers):
                kwargs["stop_at_layer"] = max(int(m.group(1)) for m in layers) + 1
        return original(self, *args, **kwargs)

    with _replaced(HookedTransformer, "run_with_cache", run_with_cache):
        yield


class _VarianceSums:
    """Running sums over the tokens core evaluates, in float64, for the conventional explained
    variance ``1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)``."""

    def __init__(self, max_norm: float | None = None) -> None:
        self.n = 0
        self.sum_x: torch.Tensor | None = None
        self.sum_sq = 0.0
        self.sum_resid = 0.0
        self.mask: torch.Tensor | None = None  # the current batch's evaluated positions
        self.x: torch.Tensor | None = None  # the current batch's SAE input
        self.max_norm = max_norm  # inputs above it are not evaluated

    def add(self, x_hat: torch.Tensor) -> None:
        if self.x is None or self.mask is None:
            raise RuntimeError("core's SAE decoded before it encoded a batch")
        d = self.x.shape[-1]
        keep = self.mask.reshape(-1).to(self.x.device)
        x_all = self.x.reshape(-1, d)
        if self.max_norm is not None:
            keep = keep & (x_all.float().norm(dim=1) <= self.max_norm)
        x = x_all[keep].double()
        r = x - x_hat.reshape(-1, d)[keep].to(x.device).double()
        self.n += len(x)
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.sum_sq += float(x.pow(2).sum())
        self.sum_resid += float(r.pow(2).sum())
        self.x = None

    def explained_variance(self) -> float:
        if not self.n or self.sum_x is None:
            return float("nan")
        total = self.sum_sq / self.n - float((self.sum_x / self.n).pow(2).sum())
        return 1.0 - (self.sum_resid / self.n) / total


class _RecordingModel:
    """The model, noting which positions of each batch core evaluates (not an ignored token)."""

    def __init__(self, model: Any, ignore_tokens: Any, sums: _VarianceSums):
        self._model, self._sums = model, sums
        self._ignore = [int(t) for t in (ignore_tokens or ()) if t is not None]

    def run_with_cache(self, tokens: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        keep = torch.ones_like(tokens, dtype=torch.bool)
        for t in self._ignore:
            keep &= tokens != t
        self._sums.mask = keep
        return self._model.run_with_cache(tokens, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class _RecordingSAE:
    """The SAE, noting each batch's input and reconstruction."""

    def __init__(self, sae: Any, sums: _VarianceSums):
        self._sae, self._sums = sae, sums

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._sums.x = x
        return self._sae.encode(x)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        out = self._sae.decode(feature_acts)
        self._sums.add(out)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sae, name)


class NormGatedSAE:
    """The SAE for every token whose input norm is at most ``max_norm``; the others (massive
    activations the SAE was not trained on) encode to no latents and decode to their input, so
    splicing the SAE into the model leaves them as they were. ``decode`` must follow the
    ``encode`` of the same batch, as core's loops do."""

    def __init__(self, sae: Any, max_norm: float):
        self._sae, self._max_norm = sae, float(max_norm)
        self._x: torch.Tensor | None = None
        self._over: torch.Tensor | None = None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._x = x
        self._over = x.float().norm(dim=-1) > self._max_norm
        return self._sae.encode(x).masked_fill(self._over.unsqueeze(-1), 0)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        out = self._sae.decode(feature_acts)
        if self._x is None or self._over is None or self._x.shape[:-1] != feature_acts.shape[:-1]:
            raise RuntimeError("NormGatedSAE.decode needs the encode of the same batch first")
        out = torch.where(self._over.unsqueeze(-1), self._x.to(out.dtype), out)
        self._x = self._over = None
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sae, name)


@contextlib.contextmanager
def core_metrics(max_norm: float | None = None) -> Iterator[None]:
    """Core's ``explained_variance`` is ``1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)`` over the
    tokens it evaluates: the variance about the mean, as its name and SAEBench's comment ("the new
    (correct) formula") intend and as SAELens computes it since fixing the same code (SAELens
    issue 659). SAEBench 0.6's aggregation subtracts ``(mean_d E[x_d^2])^2`` instead of
    ``||E x||^2``: a number between the variance about zero and about the mean that is not even
    invariant to rescaling the activations. The wrapped function is SAEBench's own; only the
    ``explained_variance`` it returns is replaced, computed from the inputs and reconstructions it
    passes through the SAE (``explained_variance_legacy`` stays as SAEBench computes it).

    With ``max_norm``, both of core's loops (variance and sparsity; CE loss and KL with the SAE
    spliced in) see the SAE through :class:`NormGatedSAE`, and the explained variance leaves
    those tokens out."""
    import sae_bench.evals.core.main as core

    variance, recons = core.get_sparsity_and_variance_metrics, core.get_recons_loss
    v_signature, r_signature = inspect.signature(variance), inspect.signature(recons)

    def gated(sae: Any) -> Any:
        return sae if max_norm is None else NormGatedSAE(sae, max_norm)

    @functools.wraps(variance)
    def wrapped_variance(*args: Any, **kwargs: Any) -> Any:
        bound = v_signature.bind(*args, **kwargs)
        sae = bound.arguments["sae"]
        per_head = sae.cfg.hook_head_index is not None or any(
            h in sae.cfg.hook_name for h in ("hook_q", "hook_k", "hook_v", "hook_z"))
        if per_head or not bound.arguments.get("compute_variance_metrics", True):
            bound.arguments["sae"] = gated(sae)
            return variance(*bound.args, **bound.kwargs)
        sums = _VarianceSums(max_norm)
        bound.arguments["sae"] = _RecordingSAE(gated(sae), sums)
        bound.arguments["model"] = _RecordingModel(bound.arguments["model"], bound.arguments.get("ignore_tokens"), sums)
        metrics, feature_metrics = variance(*bound.args, **bound.kwargs)
        if "explained_variance" in metrics:
            metrics["explained_variance"] = sums.explained_variance()
        return metrics, feature_metrics

    @functools.wraps(recons)
    def wrapped_recons(*args: Any, **kwargs: Any) -> Any:
        bound = r_signature.bind(*args, **kwargs)
        bound.arguments["sae"] = gated(bound.arguments["sae"])
        return recons(*bound.args, **bound.kwargs)

    with _replaced(core, "get_sparsity_and_variance_metrics", wrapped_variance), \
            _replaced(core, "get_recons_loss", wrapped_recons):
        yield


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
