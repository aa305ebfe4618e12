"""SAELens folders into this package: :func:`load_matryoshka_saelens` (as the registered
``matryoshka_jumprelu`` architecture) and :func:`import_from_saelens` (as this package's SAE
classes, optionally written as a ``trainer_0``-style folder)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.saes.sae import SAEMetadata

from ..checkpoints import other_folder_kind
from ..errors import CheckpointError
from ..io import FolderKind, atomic_folder, atomic_torch_save, atomic_write_json, read_json_object
from ..registry import PACKAGE_MARK
from ..sae import MatryoshkaBatchTopKSAE, MatryoshkaLogSparsitySAE
from .architecture import MATRYOSHKA_ARCHITECTURE, MatryoshkaJumpReLUSAE, MatryoshkaJumpReLUSAEConfig, check_widths

__all__ = [
    "load_matryoshka_saelens",
    "import_from_saelens",
    "IMPORT",
    "check_saelens_folder",
    "load_stock_sae",
    "widths_from_metadata",
    "k_from_metadata",
]


def _imported_here(folder: Path) -> bool:
    trainer = read_json_object(folder / "config.json").get("trainer")
    return isinstance(trainer, dict) and trainer.get("package") == PACKAGE_MARK and "imported_from" in trainer


IMPORT = FolderKind(PACKAGE_MARK, "import", frozenset({"config.json", "ae.pt"}), _imported_here)
"""A folder written by an import: ``overwrite=True`` replaces only one of these."""


def widths_from_metadata(meta: Mapping[str, Any] | SAEMetadata | None) -> list[int] | None:
    """Nested widths recorded in SAELens metadata (top level or under
    ``training_architecture_details``), or ``None``."""
    if meta is None:
        return None
    get = meta.get
    widths = get("matryoshka_widths")
    if widths is None:
        details = get("training_architecture_details") or {}
        widths = details.get("matryoshka_widths") if isinstance(details, Mapping) else None
    return None if widths is None else [int(w) for w in widths]


def k_from_metadata(meta: Mapping[str, Any] | SAEMetadata | None) -> Any:
    """``k`` recorded in SAELens metadata (top level or under ``training_architecture_details``),
    or ``None``."""
    if meta is None:
        return None
    k = meta.get("k")
    if k is None:
        details = meta.get("training_architecture_details") or {}
        k = details.get("k") if isinstance(details, Mapping) else None
    return k


def load_matryoshka_saelens(
    path: str | Path, device: str = "cpu", dtype: str | None = None, widths: Sequence[int] | None = None
) -> MatryoshkaJumpReLUSAE:
    """Load a SAELens folder (``jumprelu``, ``standard`` or ``matryoshka_jumprelu``) as a
    :class:`MatryoshkaJumpReLUSAE`, with nested widths from its metadata (or ``widths``)."""
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting, sae_lens_disk_loader

    path = Path(path)
    check_saelens_folder(path)
    try:
        cfg_dict, state = sae_lens_disk_loader(path, device, cfg_overrides={"dtype": dtype} if dtype else None)
    except Exception as e:  # noqa: BLE001 - json, safetensors and OS errors
        raise CheckpointError(f"{path} is not a readable SAELens folder (truncated or corrupt?): {e}") from None
    cfg_dict = handle_config_defaulting(cfg_dict)
    arch = cfg_dict.get("architecture")
    if arch == "standard":
        state["threshold"] = torch.zeros_like(state.get("b_enc", torch.zeros(cfg_dict["d_sae"])))
    elif arch not in ("jumprelu", MATRYOSHKA_ARCHITECTURE):
        raise CheckpointError(f"{path} holds a {arch!r} SAE; only jumprelu and standard SAEs load as {MATRYOSHKA_ARCHITECTURE}")
    if widths is None:
        widths = cfg_dict.get("matryoshka_widths") or widths_from_metadata(cfg_dict.get("metadata"))
    cfg_dict = {**cfg_dict, "architecture": MATRYOSHKA_ARCHITECTURE, "matryoshka_widths": list(widths or [])}
    try:
        cfg = MatryoshkaJumpReLUSAEConfig.from_dict(cfg_dict)
        sae = MatryoshkaJumpReLUSAE(cfg)
        sae.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path} does not hold a valid SAE: {e}") from None
    return sae


def check_saelens_folder(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a folder with SAELens' cfg and weights files."""
    if not path.is_dir():
        raise CheckpointError(f"no such SAELens folder: {path}")
    for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME):
        if not (path / name).is_file():
            hint = other_folder_kind(path, "saelens")
            raise CheckpointError(hint or f"missing {name} in {path}; is it a SAELens SAE folder?")


def load_stock_sae(path: Path, device: str) -> SAE:
    """``SAE.load_from_disk``, raising :class:`CheckpointError` for a folder SAELens cannot load."""
    check_saelens_folder(path)
    try:
        return SAE.load_from_disk(path, device=device)
    except Exception as e:  # noqa: BLE001 - SAELens raises many kinds for bad folders
        raise CheckpointError(f"SAELens could not load {path}: {type(e).__name__}: {e}") from None


def import_from_saelens(
    source: str | Path | SAE,
    *,
    k: int | None = None,
    widths: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    out_dir: str | Path | None = None,
    overwrite: bool = False,
) -> MatryoshkaBatchTopKSAE | MatryoshkaLogSparsitySAE:
    """Load a SAELens SAE (a folder or an ``SAE``, e.g. from ``SAE.from_pretrained``) into this
    package's classes, for evaluation or further training.

    * ``jumprelu`` (also ``matryoshka_jumprelu``) with one threshold shared by all latents ->
      :class:`MatryoshkaBatchTopKSAE`. Groups come from the ``matryoshka_widths`` metadata (or
      ``widths``; else one group) and ``k`` from metadata or the ``k`` argument (needed for
      training; published suites such as SAEBench's do not record it).
    * ``standard`` -> :class:`MatryoshkaLogSparsitySAE` with ``input_norm = sqrt(d)`` (scale 1).
      Its latents are magnitudes along unit decoder directions, i.e. SAELens' latents after
      ``fold_W_dec_norm()``, identical when the decoder rows have unit norm (every export here).

    Reconstructions are identical in both cases. With ``out_dir`` the SAE is also written as a
    ``trainer_0``-style folder (``config.json`` + ``ae.pt``) that :func:`load_dictionary` reads;
    ``overwrite`` replaces only a folder written by an earlier import.
    """
    if isinstance(source, SAE):
        sae, origin = source, f"{type(source).__name__} object"
    else:
        origin = str(source)
        sae = load_stock_sae(Path(source), "cpu")
    cfg = sae.cfg
    arch = cfg.architecture()
    meta = cfg.metadata
    if cfg.normalize_activations != "none":
        raise CheckpointError(
            f"{origin} normalises its input ({cfg.normalize_activations!r}); fold the normalisation into the "
            "weights first (SAELens: fold_activation_norm_scaling_factor)"
        )
    if cfg.reshape_activations != "none":
        raise CheckpointError(f"{origin} reshapes hook_z activations; this package's SAEs take flat [..., d] input")
    with torch.no_grad():
        W_enc = sae.W_enc.detach().to("cpu", torch.float32)
        W_dec = sae.W_dec.detach().to("cpu", torch.float32)
        b_dec = sae.b_dec.detach().to("cpu", torch.float32)
        b_enc = sae.b_enc.detach().to("cpu", torch.float32)
    d, n = W_enc.shape
    if widths is None:
        widths = getattr(cfg, "matryoshka_widths", None) or widths_from_metadata(meta)
    if arch in ("jumprelu", MATRYOSHKA_ARCHITECTURE):
        thr = sae.threshold.detach().to("cpu", torch.float32).reshape(-1)
        if not bool((thr == thr[0]).all()):
            raise CheckpointError(
                f"{origin} has per-latent thresholds ({float(thr.min()):.4g} .. {float(thr.max()):.4g}); "
                "MatryoshkaBatchTopKSAE has one threshold shared by all latents"
            )
        if k is None:
            k = k_from_metadata(meta)
        if k is None:
            raise CheckpointError(
                f"{origin} does not record k (the BatchTopK target L0); pass k= (it only matters for training)"
            )
        if isinstance(k, float) and not k.is_integer():
            raise CheckpointError(f"{origin} records a non-integer k={k}; pass an integer k=")
        try:
            group_sizes = torch.diff(torch.tensor([0] + check_widths(widths, n))).tolist()
            out = MatryoshkaBatchTopKSAE(d, n, int(k), group_sizes)
        except ValueError as e:
            raise CheckpointError(f"cannot import {origin}: {e}") from None
        if not cfg.apply_b_dec_to_input:
            b_enc = b_enc + b_dec @ W_enc  # our encoder always subtracts b_dec first
        # A negative threshold acts like 0 after the ReLU, and ours must be >= 0 to be used.
        state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "k": out.k,
                 "threshold": thr[0].clamp_min(0.0), "group_sizes": out.group_sizes}
    elif arch == "standard":
        out = MatryoshkaLogSparsitySAE(d, n)
        if cfg.apply_b_dec_to_input:
            b_enc = b_enc - b_dec @ W_enc
        # Scale 1 (input_norm = sqrt(d)); the raw decoder keeps SAELens' row norms and encode
        # multiplies latents by them, so decode(encode(x)) is SAELens' forward exactly.
        state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec,
                 "input_norm": torch.tensor(math.sqrt(d))}
    else:
        raise CheckpointError(
            f"cannot import a {arch!r} SAE from {origin}: this package represents jumprelu (shared threshold) "
            "and standard SAEs"
        )
    out.load_state_dict(state)
    out = out.to(device)
    if out_dir is not None:
        _write_trainer_folder(out, Path(out_dir), overwrite, meta, origin)
    return out


def _write_trainer_folder(ae: torch.nn.Module, out_dir: Path, overwrite: bool, meta: Any, origin: str) -> None:
    """A ``trainSAE``-style folder (``config.json`` + ``ae.pt``) that ``load_dictionary`` reads."""
    trainer: dict[str, Any] = {
        "dict_class": type(ae).__name__,
        "package": PACKAGE_MARK,
        "activation_dim": int(ae.activation_dim),
        "dict_size": int(ae.dict_size),
        "lm_name": meta.get("model_name") if meta is not None else None,
        "layer": meta.get("hook_layer") if meta is not None else None,
        "submodule_name": None,
        "hook_name": meta.get("hook_name") if meta is not None else None,
        "imported_from": origin,
    }
    if isinstance(ae, MatryoshkaBatchTopKSAE):
        trainer.update(k=int(ae.k), group_sizes=ae.group_sizes.tolist())
    config = {"trainer": trainer, "buffer": {"ctx_len": meta.get("context_size") if meta is not None else None}}
    state = {k: v.detach().cpu() for k, v in ae.state_dict().items()}

    with atomic_folder(out_dir, overwrite, IMPORT) as tmp:
        atomic_torch_save(state, tmp / "ae.pt")
        atomic_write_json(config, tmp / "config.json")
