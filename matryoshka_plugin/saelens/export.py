"""Export a ``trainSAE`` folder as a SAELens folder that stock SAELens loads.

:func:`export_to_saelens` runs these steps, each a function here: load the dictionary and convert
it with its registered converter (:mod:`.convert`), :func:`sparsity` (optional firing
frequencies), :func:`build_metadata`, :func:`build_cfg`, then :func:`write_export` into a temporary
folder, :func:`verify_export` there, and rename it into place
(:func:`~matryoshka_plugin.io.atomic_folder`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import sae_lens
import torch
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME

from .._version import __version__
from ..checkpoints import load_dictionary
from ..errors import CheckpointError
from ..hook_names import default_prepend_bos, tl_hook_name, tl_model_name
from ..io import FolderKind, atomic_folder, atomic_write_json, check_out_dir, read_json_object, write_safetensors
from ..registry import PACKAGE_MARK
from .architecture import MATRYOSHKA_ARCHITECTURE
from .convert import SAELensWeights, converter_for

__all__ = [
    "export_to_saelens",
    "EXPORT",
    "SAELENS_FILES",
    "DTYPES",
    "sparsity",
    "build_metadata",
    "build_cfg",
    "write_export",
    "verify_export",
]

SAELENS_FILES = (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME)
"""The files of an exported folder, and all that SAELens' uploader publishes from it."""
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Weight dtypes an export may write."""


def _exported_here(folder: Path) -> bool:
    meta = read_json_object(folder / SAE_CFG_FILENAME).get("metadata")
    return isinstance(meta, dict) and str(meta.get("exported_by", "")).startswith(PACKAGE_MARK + " ")


EXPORT = FolderKind(PACKAGE_MARK, "SAELens export", frozenset(SAELENS_FILES), _exported_here)
"""An exported folder: ``overwrite=True`` replaces only one of these."""


def export_to_saelens(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    model_name: str | None = None,
    hook_name: str | None = None,
    context_size: int | None = None,
    dataset_path: str | None = None,
    prepend_bos: bool | None = None,
    hook_head_index: int | None = None,
    activations: torch.Tensor | None = None,
    firing_frequencies: torch.Tensor | None = None,
    architecture: str = "auto",
    dtype: str = "float32",
    checkpoint: int | str | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Export a ``trainSAE`` ``trainer_i`` folder as a SAELens SAE folder; returns ``out_dir``.

    Args:
        checkpoint_dir: folder with ``config.json`` and ``ae.pt`` (this package's trainers or
            dictionary_learning's BatchTopK, TopK, standard and Matryoshka trainers, or any class
            registered with a SAELens converter in :mod:`matryoshka_plugin.registry`).
        out_dir: the SAELens folder to create. It must not exist or be empty unless
            ``overwrite``; it is written to a temporary sibling and renamed into place, so it is
            never left half-written, and of two exports racing to create it one fails with
            :class:`FileExistsError`. Folder and files get the modes the umask gives new ones.
        model_name, hook_name, context_size, dataset_path, prepend_bos, hook_head_index: SAELens
            metadata. Defaults come from the config: the TransformerLens model name from
            ``lm_name``, the hook from ``submodule_name`` and the buffer's ``io``
            (:func:`~matryoshka_plugin.hook_names.tl_hook_name`), ``context_size`` from the
            buffer's ``ctx_len``, ``prepend_bos`` False for GPT-2/Pythia (their tokenizers add no
            BOS) and True otherwise.
        activations: optional ``[..., d]`` tensor of activations; firing frequencies measured on
            it are written to ``sparsity.safetensors`` (log10, as SAELens stores them).
        firing_frequencies: or give the per-latent firing frequencies ``[d_sae]`` in [0, 1].
        architecture: ``"auto"`` (stock SAELens: ``jumprelu``, ``topk`` or ``standard``) or
            ``"matryoshka_jumprelu"`` for :class:`~.architecture.MatryoshkaJumpReLUSAE` (loading it
            then needs this package imported).
        dtype: weight dtype on disk (``float32`` by default; half precision is lossy).
        checkpoint: export ``checkpoints/ae_{step}.pt`` instead of ``ae.pt`` (``"latest"``: the
            newest complete one, see :func:`~matryoshka_plugin.load_dictionary`).
        extra_metadata: more metadata keys (they round-trip through SAELens).
        overwrite: replace an existing ``out_dir`` that holds an earlier export of this package
            (atomically). A folder with any other file is refused, naming those files.
        verify: load the result with stock SAELens before publishing it and compare outputs.
    """
    src = Path(checkpoint_dir)
    out_dir = Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if architecture not in ("auto", MATRYOSHKA_ARCHITECTURE):
        raise ValueError(f"architecture must be 'auto' or {MATRYOSHKA_ARCHITECTURE!r}, got {architecture!r}")
    if activations is not None and firing_frequencies is not None:
        raise ValueError("give activations or firing_frequencies, not both")
    check_out_dir(out_dir, overwrite, EXPORT)  # fail before any work
    if src.resolve() == out_dir.resolve():
        raise ValueError("out_dir must differ from checkpoint_dir")
    if not src.is_dir():
        raise CheckpointError(f"no such SAE folder: {src}")
    ae, config = load_dictionary(src, device="cpu", checkpoint=checkpoint)
    ae.eval()
    trainer_cfg: dict = config["trainer"]
    buffer_cfg: dict = config.get("buffer") or {}
    conv = converter_for(ae, trainer_cfg)(ae, trainer_cfg)
    weights = dict(conv.weights)
    arch = conv.architecture
    if architecture == MATRYOSHKA_ARCHITECTURE:
        if arch == "topk":
            raise ValueError("a per-token TopK SAE cannot be exported as matryoshka_jumprelu; use architecture='auto'")
        if arch == "standard":  # ReLU == JumpReLU with threshold 0
            weights["threshold"] = torch.zeros(weights["W_enc"].shape[1])
        arch = MATRYOSHKA_ARCHITECTURE

    if hook_name is None:
        try:
            hook_name = tl_hook_name(trainer_cfg.get("submodule_name"), buffer_cfg.get("io", "out"),
                                     trainer_cfg.get("layer"), trainer_cfg.get("lm_name"))
        except ValueError as e:
            raise ValueError(f"{src}: {e}") from None
    if context_size is None and buffer_cfg.get("ctx_len") is not None:
        context_size = int(buffer_cfg["ctx_len"])
    log_freq = sparsity(ae, int(weights["W_enc"].shape[1]), activations, firing_frequencies)
    metadata = build_metadata(
        conv, trainer_cfg, buffer_cfg,
        model_name=model_name, hook_name=hook_name, hook_head_index=hook_head_index, context_size=context_size,
        prepend_bos=prepend_bos, dataset_path=dataset_path, extra_metadata=extra_metadata,
    )
    cfg = build_cfg(conv, arch, weights, dtype, metadata)
    probe = _probe_inputs(weights, activations)
    weights = {k: v.to(DTYPES[dtype]) for k, v in weights.items()}

    with atomic_folder(out_dir, overwrite, EXPORT) as tmp:
        write_export(tmp, weights, log_freq, cfg)
        if verify:
            verify_export(tmp, ae, probe, dtype)
    return out_dir


# ----------------------------------------------------------------------------------------------
# Sparsity
# ----------------------------------------------------------------------------------------------


def sparsity(
    ae: torch.nn.Module, d_sae: int, activations: torch.Tensor | None, firing_frequencies: torch.Tensor | None
) -> torch.Tensor | None:
    """SAELens' ``sparsity`` tensor (log10 firing frequency per latent) from given frequencies or
    measured on ``activations``; ``None`` when neither is given."""
    if firing_frequencies is not None:
        freq = torch.as_tensor(firing_frequencies).detach().cpu().reshape(-1).to(torch.float64)
        if freq.numel() != d_sae or not bool(((freq >= 0) & (freq <= 1)).all()):
            raise ValueError(f"firing_frequencies must be {d_sae} values in [0, 1], got shape {tuple(freq.shape)}")
        return _log_sparsity(freq)
    if activations is not None:
        counts, n_tokens = _firing_counts(ae, activations)
        return _log_sparsity(counts / n_tokens)
    return None


def _firing_counts(ae: torch.nn.Module, activations: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, int]:
    d = int(ae.activation_dim)
    if not isinstance(activations, torch.Tensor) or activations.shape[-1] != d or not activations.is_floating_point():
        raise ValueError(f"activations must be a float tensor [..., {d}], got {getattr(activations, 'shape', type(activations))}")
    x = activations.reshape(-1, d)
    if x.shape[0] == 0 or not bool(torch.isfinite(x).all()):
        raise ValueError("activations must be non-empty and finite")
    counts = torch.zeros(int(ae.dict_size), dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            f = ae.encode(x[i : i + chunk].to("cpu", _ae_dtype(ae)))
            counts += (f != 0).sum(0).to(torch.float64).cpu()
    return counts, x.shape[0]


def _ae_dtype(ae: torch.nn.Module) -> torch.dtype:
    return next(ae.parameters()).dtype


def _log_sparsity(freq: torch.Tensor) -> torch.Tensor:
    # SAELens' convention: log10 of the firing frequency, with 1e-10 added so dead latents are finite.
    return torch.log10(freq.to(torch.float64) + 1e-10).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# Metadata and cfg.json
# ----------------------------------------------------------------------------------------------


def build_metadata(
    conv: SAELensWeights,
    trainer_cfg: Mapping[str, Any],
    buffer_cfg: Mapping[str, Any],
    *,
    model_name: str | None,
    hook_name: str,
    hook_head_index: int | None,
    context_size: int | None,
    prepend_bos: bool | None,
    dataset_path: str | None,
    extra_metadata: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """SAELens metadata: where the SAE reads activations, how it was trained (the whole trainer
    config, nested widths, ``k``), and the ``exported_by`` mark that lets ``overwrite`` replace it."""
    lm_name = trainer_cfg.get("lm_name")
    details = {**trainer_cfg}
    if conv.widths is not None:
        details["matryoshka_widths"] = conv.widths
    if conv.k is not None:
        details["k"] = conv.k
    return {
        "sae_lens_version": sae_lens.__version__,
        "sae_lens_training_version": None,  # trained with dictionary_learning, not SAELens
        "model_name": model_name if model_name is not None else tl_model_name(lm_name),
        "hook_name": hook_name,
        "hook_head_index": hook_head_index,
        "hook_layer": trainer_cfg.get("layer"),
        "context_size": context_size,
        "prepend_bos": prepend_bos if prepend_bos is not None else default_prepend_bos(lm_name),
        "dataset_path": dataset_path,
        "model_from_pretrained_kwargs": {},
        "training_architecture": conv.training_architecture,
        "training_architecture_details": details,
        "matryoshka_widths": conv.widths,
        "k": conv.k,
        "dictionary_learning_buffer": dict(buffer_cfg),
        **dict(extra_metadata or {}),
        "exported_by": f"{PACKAGE_MARK} {__version__}",  # the mark that lets overwrite=True replace it
    }


def build_cfg(
    conv: SAELensWeights, arch: str, weights: Mapping[str, torch.Tensor], dtype: str, metadata: dict[str, Any]
) -> dict[str, Any]:
    """The ``cfg.json`` of the export (``arch``: ``conv.architecture`` or ``matryoshka_jumprelu``);
    raises ``ValueError`` if anything in it is not JSON-serialisable."""
    d_in, d_sae = weights["W_enc"].shape
    cfg = {
        "architecture": arch,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": conv.apply_b_dec_to_input,
        "normalize_activations": "none",  # any normalisation is already in the weights
        "reshape_activations": "none",
        **conv.extra_cfg,
        "metadata": metadata,
    }
    if arch == MATRYOSHKA_ARCHITECTURE:
        cfg["matryoshka_widths"] = conv.widths or [int(d_sae)]
    try:
        json.dumps(cfg)
    except TypeError as e:
        raise ValueError(f"metadata must be JSON-serialisable: {e}") from None
    return cfg


# ----------------------------------------------------------------------------------------------
# Write and verify
# ----------------------------------------------------------------------------------------------


def write_export(folder: Path, weights: dict[str, torch.Tensor], log_sparsity: torch.Tensor | None,
                 cfg: Mapping[str, Any]) -> None:
    """Write the SAELens files into ``folder`` (the temporary folder of the export)."""
    write_safetensors(folder / SAE_WEIGHTS_FILENAME, weights)
    if log_sparsity is not None:
        write_safetensors(folder / SPARSITY_FILENAME, {"sparsity": log_sparsity})
    # cfg.json last: a folder without it is never mistaken for a SAELens SAE.
    atomic_write_json(cfg, folder / SAE_CFG_FILENAME)


def _probe_inputs(weights: Mapping[str, torch.Tensor], activations: torch.Tensor | None) -> torch.Tensor:
    W_dec = weights["W_dec"]
    d = W_dec.shape[1]
    if activations is not None:
        return activations.reshape(-1, d)[:256].detach().cpu().float()
    # Inputs along decoder directions (plus b_dec), so threshold SAEs have some active latents.
    g = torch.Generator().manual_seed(0)
    mix = torch.rand(64, W_dec.shape[0], generator=g) * (torch.rand(64, W_dec.shape[0], generator=g) < 0.1)
    return mix @ W_dec + weights["b_dec"] + 0.1 * torch.randn(64, d, generator=g)


def verify_export(folder: Path, ae: torch.nn.Module, probe: torch.Tensor, dtype: str) -> None:
    """Load ``folder`` with stock SAELens and compare its latents and reconstructions with ``ae``
    on ``probe``; raises ``RuntimeError`` above 1e-4 relative error. Lossy dtypes are not checked."""
    if dtype not in ("float32", "float64"):
        return  # a lossy cast: nothing exact to check
    sae = SAE.load_from_disk(folder, device="cpu")
    x = probe.to(torch.float32)
    with torch.no_grad():
        f_ref, f = ae.encode(x.to(_ae_dtype(ae))).float(), sae.encode(x).float()
        y_ref, y = ae.decode(f_ref.to(_ae_dtype(ae))).float(), sae.decode(f).float()
    for name, a, b in (("latents", f, f_ref), ("reconstructions", y, y_ref)):
        err = float((a - b).norm() / b.norm().clamp_min(1e-12))
        if err > 1e-4:
            raise RuntimeError(f"export check failed: stock SAELens {name} differ from the original by {err:.2e}")
