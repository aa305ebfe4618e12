"""SAELens export, import, a registered Matryoshka architecture, and publishing.

* :func:`export_to_saelens` turns a ``trainer_i`` folder written by dictionary_learning's
  ``trainSAE`` into a SAELens folder (``cfg.json``, ``sae_weights.safetensors`` and, when firing
  frequencies are known, ``sparsity.safetensors``) that stock SAELens loads with
  ``SAE.load_from_disk`` and that computes the same latents and reconstructions:

  ==========================================================  ============  =====================
  dictionary class                                            SAELens       notes
  ==========================================================  ============  =====================
  ``MatryoshkaBatchTopKSAE`` (ours or dictionary_learning's)  ``jumprelu``  scalar threshold
  ``BatchTopKSAE`` (dictionary_learning)                      ``jumprelu``  broadcast per latent
  ``AutoEncoderTopK`` (dictionary_learning)                   ``topk``      per-token top-k
  ``AutoEncoder`` (dictionary_learning)                       ``standard``  unit decoder rows
  ``MatryoshkaLogSparsitySAE`` (ours)                         ``standard``  scale, norms folded
  ==========================================================  ============  =====================

* Importing this module registers the SAELens inference architecture ``matryoshka_jumprelu``
  (:class:`MatryoshkaJumpReLUSAE`): a JumpReLU SAE that keeps the nested widths and can act as any
  prefix of itself (``active_width``) or hand out a truncated stock SAE (``truncated(width)``).
* :func:`import_from_saelens` reads a SAELens folder or ``SAE`` object back into this package's
  classes; :func:`publish_to_huggingface` uploads exported folders with SAELens' own uploader.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import sae_lens
import torch
from safetensors.torch import save_file
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata

from .checkpoints import PACKAGE_MARK, atomic_torch_save, default_dir_mode, default_file_mode, load_dictionary
from .errors import CheckpointError
from .hook_names import default_prepend_bos, tl_hook_name, tl_model_name
from .sae import MatryoshkaBatchTopKSAE, MatryoshkaLogSparsitySAE

__all__ = [
    "MATRYOSHKA_ARCHITECTURE",
    "MatryoshkaJumpReLUSAE",
    "MatryoshkaJumpReLUSAEConfig",
    "register_saelens_architecture",
    "export_to_saelens",
    "import_from_saelens",
    "load_matryoshka_saelens",
    "publish_to_huggingface",
    "PublishPlan",
    "tl_hook_name",
    "tl_model_name",
]

MATRYOSHKA_ARCHITECTURE = "matryoshka_jumprelu"
# The files SAELens' uploader publishes from each SAE folder (runner_cfg.json is never written here).
_PUBLISHED_FILES = (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME)
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------
# The registered architecture
# ----------------------------------------------------------------------------------------------


def _check_widths(widths: Iterable[int] | None, d_sae: int) -> list[int]:
    """Cumulative nested widths, strictly increasing, ending at ``d_sae`` (appended if missing)."""
    out = [] if widths is None else list(widths)
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or int(w) != w for w in out):
        raise ValueError(f"matryoshka widths must be integers, got {out}")
    out = [int(w) for w in out]
    if any(w < 1 for w in out) or any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"matryoshka widths must be positive and strictly increasing, got {out}")
    if out and out[-1] > d_sae:
        raise ValueError(f"matryoshka widths {out} exceed d_sae={d_sae}")
    if not out or out[-1] != d_sae:
        out.append(d_sae)
    return out


@dataclass
class MatryoshkaJumpReLUSAEConfig(JumpReLUSAEConfig):
    """JumpReLU config plus ``matryoshka_widths``: cumulative end indices of the nested levels."""

    matryoshka_widths: list[int] = field(default_factory=list)

    @classmethod
    def architecture(cls) -> str:
        return MATRYOSHKA_ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        self.matryoshka_widths = _check_widths(self.matryoshka_widths, self.d_sae)


class MatryoshkaJumpReLUSAE(JumpReLUSAE):
    """A SAELens JumpReLU SAE whose latents form nested dictionaries.

    ``sae.active_width = w`` makes ``encode``/``forward`` use only latents ``[0, w)`` (the
    hooks see the truncated latents); ``sae.truncated(w)`` returns an independent stock
    ``JumpReLUSAE`` with just those latents. Any ``w`` works; ``cfg.matryoshka_widths`` lists
    the widths that were trained as levels. A standard (ReLU) SAE is this with threshold 0.
    """

    cfg: MatryoshkaJumpReLUSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: MatryoshkaJumpReLUSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self._active_width = cfg.d_sae

    @property
    def matryoshka_widths(self) -> list[int]:
        return list(self.cfg.matryoshka_widths)

    @property
    def active_width(self) -> int:
        return self._active_width

    @active_width.setter
    def active_width(self, width: int | None) -> None:
        width = self.cfg.d_sae if width is None else width
        if isinstance(width, bool) or int(width) != width or not (1 <= int(width) <= self.cfg.d_sae):
            raise ValueError(f"active_width must be an integer in [1, d_sae={self.cfg.d_sae}], got {width!r}")
        self._active_width = int(width)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        acts = self.activation_fn(hidden_pre) * (hidden_pre > self.threshold).to(hidden_pre.dtype)
        if self._active_width < self.cfg.d_sae:
            keep = torch.arange(self.cfg.d_sae, device=acts.device) < self._active_width
            acts = acts * keep.to(acts.dtype)
        return self.hook_sae_acts_post(acts)

    def truncated(self, width: int) -> JumpReLUSAE:
        """A stock SAELens ``JumpReLUSAE`` made of the first ``width`` latents (a copy)."""
        if isinstance(width, bool) or int(width) != width or not (1 <= int(width) <= self.cfg.d_sae):
            raise ValueError(f"width must be an integer in [1, d_sae={self.cfg.d_sae}], got {width!r}")
        width = int(width)
        meta = SAEMetadata(**copy.deepcopy(self.cfg.metadata.to_dict()))
        meta.matryoshka_widths = [w for w in self.cfg.matryoshka_widths if w < width] + [width]
        meta.truncated_from_d_sae = self.cfg.d_sae
        cfg = JumpReLUSAEConfig(
            d_in=self.cfg.d_in,
            d_sae=width,
            dtype=self.cfg.dtype,
            device=str(self.W_enc.device),
            apply_b_dec_to_input=self.cfg.apply_b_dec_to_input,
            normalize_activations=self.cfg.normalize_activations,
            reshape_activations=self.cfg.reshape_activations,
            metadata=meta,
        )
        sae = JumpReLUSAE(cfg)
        with torch.no_grad():
            sae.load_state_dict(
                {
                    "W_enc": self.W_enc[:, :width].clone(),
                    "b_enc": self.b_enc[:width].clone(),
                    "W_dec": self.W_dec[:width].clone(),
                    "b_dec": self.b_dec.clone(),
                    "threshold": self.threshold[:width].clone(),
                }
            )
        return sae

    def levels(self) -> list[JumpReLUSAE]:
        """One truncated stock SAE per trained nested width."""
        return [self.truncated(w) for w in self.cfg.matryoshka_widths]


def register_saelens_architecture() -> None:
    """Register ``matryoshka_jumprelu`` with SAELens; calling it again is harmless.

    SAELens raises on a second registration of a name, so this checks first; a reloaded copy of
    this module replaces its own older entry, and a name taken by another package is an error.
    """
    entry = SAE_CLASS_REGISTRY.get(MATRYOSHKA_ARCHITECTURE)
    if entry is None:
        register_sae_class(MATRYOSHKA_ARCHITECTURE, MatryoshkaJumpReLUSAE, MatryoshkaJumpReLUSAEConfig)
        return
    if entry == (MatryoshkaJumpReLUSAE, MatryoshkaJumpReLUSAEConfig):
        return
    owner = entry[0]
    if (owner.__module__, owner.__qualname__) == (__name__, MatryoshkaJumpReLUSAE.__qualname__):
        SAE_CLASS_REGISTRY[MATRYOSHKA_ARCHITECTURE] = (MatryoshkaJumpReLUSAE, MatryoshkaJumpReLUSAEConfig)
        return
    raise ValueError(
        f"the SAELens architecture name {MATRYOSHKA_ARCHITECTURE!r} is already taken by "
        f"{owner.__module__}.{owner.__qualname__}"
    )


register_saelens_architecture()


# ----------------------------------------------------------------------------------------------
# Names: TransformerLens hook and model names from dictionary_learning's config
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


@dataclass
class _Converted:
    architecture: str  # SAELens inference architecture
    training_architecture: str
    weights: dict[str, torch.Tensor]
    apply_b_dec_to_input: bool
    extra_cfg: dict[str, Any]
    k: int | None = None
    widths: list[int] | None = None


def _dl_class(name: str):
    # Imported lazily: dictionary_learning's Matryoshka module is not exported from trainers/.
    from dictionary_learning.dictionary import AutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE as UpMatryoshka
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    return {"AutoEncoder": AutoEncoder, "BatchTopKSAE": BatchTopKSAE, "UpMatryoshka": UpMatryoshka,
            "AutoEncoderTopK": AutoEncoderTopK}[name]


def _threshold_or_raise(ae: torch.nn.Module, trainer_cfg: dict) -> float:
    thr = float(ae.threshold)
    if not math.isfinite(thr) or thr < 0:
        start = trainer_cfg.get("threshold_start_step", "threshold_start_step")
        raise CheckpointError(
            f"this {type(ae).__name__} has no inference threshold yet (threshold={thr}): the threshold is only "
            f"estimated after threshold_start_step={start} and this SAE was trained for {trainer_cfg.get('steps', '?')} "
            "steps (or saved earlier). Until then it can only encode by BatchTopK over a whole batch, which SAELens "
            "cannot represent per token. Train past threshold_start_step (or export a later checkpoint)."
        )
    return thr


def _convert(ae: torch.nn.Module, trainer_cfg: dict) -> _Converted:
    """Stock-SAELens weights reproducing ``ae.encode``/``ae.decode`` exactly."""
    f32 = lambda t: t.detach().to("cpu", torch.float32).clone().contiguous()  # noqa: E731
    n = int(ae.dict_size)
    if isinstance(ae, (MatryoshkaBatchTopKSAE, _dl_class("UpMatryoshka"))):
        thr = _threshold_or_raise(ae, trainer_cfg)
        widths = [int(w) for w in torch.cumsum(ae.group_sizes.detach().cpu(), 0).tolist()]
        active = getattr(ae, "active_groups", len(widths))
        if active != len(widths):
            raise CheckpointError(f"export the full SAE: active_groups={active} of {len(widths)}")
        w = {"W_enc": f32(ae.W_enc), "b_enc": f32(ae.b_enc), "W_dec": f32(ae.W_dec), "b_dec": f32(ae.b_dec)}
        w["threshold"] = torch.full((n,), thr, dtype=torch.float32)
        return _Converted("jumprelu", "matryoshka_batchtopk", w, True, {}, int(ae.k), widths)
    if isinstance(ae, _dl_class("BatchTopKSAE")):
        thr = _threshold_or_raise(ae, trainer_cfg)
        w = {"W_enc": f32(ae.encoder.weight.T), "b_enc": f32(ae.encoder.bias), "W_dec": f32(ae.decoder.weight.T),
             "b_dec": f32(ae.b_dec), "threshold": torch.full((n,), thr, dtype=torch.float32)}
        return _Converted("jumprelu", "batchtopk", w, True, {}, int(ae.k))
    if isinstance(ae, _dl_class("AutoEncoderTopK")):
        # Both relu-then-topk (dictionary_learning) and topk-then-relu (SAELens) keep the k largest
        # pre-activations and zero the non-positive ones: the same latents.
        w = {"W_enc": f32(ae.encoder.weight.T), "b_enc": f32(ae.encoder.bias), "W_dec": f32(ae.decoder.weight.T),
             "b_dec": f32(ae.b_dec)}
        return _Converted("topk", "topk", w, True, {"k": int(ae.k), "rescale_acts_by_decoder_norm": False}, int(ae.k))
    if isinstance(ae, _dl_class("AutoEncoder")):
        # load_dictionary hands out the decoder-normalised AutoEncoder; export exactly that.
        w = {"W_enc": f32(ae.encoder.weight.T), "b_enc": f32(ae.encoder.bias), "W_dec": f32(ae.decoder.weight.T),
             "b_dec": f32(ae.bias)}
        return _Converted("standard", "standard", w, True, {})
    if isinstance(ae, MatryoshkaLogSparsitySAE):
        with torch.no_grad():
            w = {k: f32(v) for k, v in ae.folded_weights().items()}
        groups = trainer_cfg.get("group_sizes")
        widths = [int(x) for x in torch.cumsum(torch.tensor(groups), 0).tolist()] if groups else [n]
        return _Converted("standard", "matryoshka_log_sparsity", w, False, {}, None, widths)
    raise CheckpointError(
        f"export does not support {type(ae).__name__} (dict_class {trainer_cfg.get('dict_class')!r}); supported: "
        "MatryoshkaBatchTopKSAE, MatryoshkaLogSparsitySAE, BatchTopKSAE, AutoEncoderTopK, AutoEncoder"
    )


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@dataclass(frozen=True)
class _FolderKind:
    """What a folder written here holds: the only files it may contain, and the mark that says
    this package wrote it. Only such a folder is replaced on ``overwrite``."""

    what: str
    files: frozenset[str]
    is_ours: Callable[[Path], bool]


def _read_json_dict(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _exported_here(folder: Path) -> bool:
    meta = _read_json_dict(folder / SAE_CFG_FILENAME).get("metadata")
    return isinstance(meta, dict) and str(meta.get("exported_by", "")).startswith(PACKAGE_MARK + " ")


def _imported_here(folder: Path) -> bool:
    trainer = _read_json_dict(folder / "config.json").get("trainer")
    return isinstance(trainer, dict) and trainer.get("package") == PACKAGE_MARK and "imported_from" in trainer


_EXPORT = _FolderKind("SAELens export", frozenset(_PUBLISHED_FILES), _exported_here)
_IMPORT = _FolderKind("import", frozenset({"config.json", "ae.pt"}), _imported_here)


def _check_out_dir(out_dir: Path, overwrite: bool, kind: _FolderKind | None = None) -> None:
    """Raise :class:`FileExistsError` unless ``out_dir`` is absent, an empty folder, or (with
    ``overwrite``) a folder that holds only what an earlier ``kind`` written here put there."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if not out_dir.is_dir():
        return
    names = sorted(p.name for p in out_dir.iterdir())
    if not names:
        return
    if not overwrite or kind is None:
        raise FileExistsError(f"{out_dir} already exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    foreign = [n for n in names if n not in kind.files or not (out_dir / n).is_file()]
    if foreign:
        raise FileExistsError(
            f"refusing to overwrite {out_dir}: it holds files that no {PACKAGE_MARK} {kind.what} writes: {foreign}; "
            "move them away or choose another folder"
        )
    if not kind.is_ours(out_dir):
        raise FileExistsError(
            f"refusing to overwrite {out_dir}: it was not written by {PACKAGE_MARK}'s {kind.what} ({names}); "
            "remove it yourself or choose another folder"
        )


def _apply_umask(folder: Path) -> None:
    """Give a folder made by ``mkdtemp`` (0700) and its files the modes the umask gives new ones."""
    dir_mode, file_mode = default_dir_mode(), default_file_mode()
    for p in folder.rglob("*"):
        os.chmod(p, dir_mode if p.is_dir() else file_mode)
    os.chmod(folder, dir_mode)


def _rename_into_place(src: Path, dst: Path) -> None:
    """``rename(src, dst)``, failing if ``dst`` holds anything. POSIX rename checks that atomically:
    it replaces only an empty folder, so of two writers to the same new folder exactly one wins."""
    if os.name == "nt" and dst.is_dir() and not any(dst.iterdir()):
        os.rmdir(dst)  # Windows renames onto nothing existing
    try:
        os.rename(src, dst)
    except OSError as e:
        if isinstance(e, FileExistsError) or e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            raise FileExistsError(
                f"{dst} was written by someone else while this export ran; it was left as it is and nothing of "
                "this one was kept"
            ) from None
        raise


def _publish_dir(tmp: Path, out_dir: Path, overwrite: bool, kind: _FolderKind | None) -> None:
    """Move the finished ``tmp`` folder to ``out_dir``; with ``overwrite`` an existing one is first
    renamed aside and only deleted once the new folder is in place, so ``out_dir`` is always absent
    or complete, and a folder that appeared meanwhile is never replaced unseen."""
    _fsync_dir(tmp)
    old = None
    if overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        _check_out_dir(out_dir, overwrite, kind)  # again: files may have been added meanwhile
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        try:
            os.rename(out_dir, old)
        except FileNotFoundError:  # another writer moved it first
            old = None
    try:
        _rename_into_place(tmp, out_dir)
    except BaseException:
        if old is not None:
            if out_dir.exists():  # another writer's folder is there now; ours is superseded too
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, out_dir)
        raise
    _fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_folder_atomically(
    out_dir: Path, overwrite: bool, write: Callable[[Path], None], kind: _FolderKind
) -> Path:
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite, kind)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        extra = sorted(p.name for p in tmp.iterdir() if p.name not in kind.files)
        if extra:  # a folder holding these could not be overwritten later
            raise RuntimeError(f"internal error: the {kind.what} wrote unexpected files {extra}")
        _apply_umask(tmp)
        _check_out_dir(out_dir, overwrite, kind)  # fail early if something appeared meanwhile
        _publish_dir(tmp, out_dir, overwrite, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _verify(folder: Path, ae: torch.nn.Module, probe: torch.Tensor, dtype: str) -> None:
    """Load the written folder with stock SAELens and compare it with ``ae`` on ``probe``."""
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
            dictionary_learning's BatchTopK, TopK, standard and Matryoshka trainers).
        out_dir: the SAELens folder to create. It must not exist or be empty unless
            ``overwrite``; it is written to a temporary sibling and renamed into place, so it is
            never left half-written, and of two exports racing to create it one fails with
            :class:`FileExistsError`. Folder and files get the modes the umask gives new ones.
        model_name, hook_name, context_size, dataset_path, prepend_bos, hook_head_index: SAELens
            metadata. Defaults come from the config: the TransformerLens model name from
            ``lm_name``, the hook from ``submodule_name`` and the buffer's ``io``
            (:func:`tl_hook_name`), ``context_size`` from the buffer's ``ctx_len``, ``prepend_bos``
            False for GPT-2/Pythia (their tokenizers add no BOS) and True otherwise.
        activations: optional ``[..., d]`` tensor of activations; firing frequencies measured on
            it are written to ``sparsity.safetensors`` (log10, as SAELens stores them).
        firing_frequencies: or give the per-latent firing frequencies ``[d_sae]`` in [0, 1].
        architecture: ``"auto"`` (stock SAELens: ``jumprelu``, ``topk`` or ``standard``) or
            ``"matryoshka_jumprelu"`` for :class:`MatryoshkaJumpReLUSAE` (loading it then needs
            this package imported).
        dtype: weight dtype on disk (``float32`` by default; half precision is lossy).
        checkpoint: export ``checkpoints/ae_{step}.pt`` instead of ``ae.pt`` (``"latest"``: the
            newest complete one, see :func:`load_dictionary`).
        extra_metadata: more metadata keys (they round-trip through SAELens).
        overwrite: replace an existing ``out_dir`` that holds an earlier export of this package
            (atomically). A folder with any other file is refused, naming those files.
        verify: load the result with stock SAELens before publishing it and compare outputs.
    """
    src = Path(checkpoint_dir)
    out_dir = Path(out_dir)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if architecture not in ("auto", MATRYOSHKA_ARCHITECTURE):
        raise ValueError(f"architecture must be 'auto' or {MATRYOSHKA_ARCHITECTURE!r}, got {architecture!r}")
    if activations is not None and firing_frequencies is not None:
        raise ValueError("give activations or firing_frequencies, not both")
    _check_out_dir(out_dir, overwrite, _EXPORT)  # fail before any work
    if src.resolve() == out_dir.resolve():
        raise ValueError("out_dir must differ from checkpoint_dir")
    if not src.is_dir():
        raise CheckpointError(f"no such SAE folder: {src}")
    ae, config = load_dictionary(src, device="cpu", checkpoint=checkpoint)
    ae.eval()
    trainer_cfg: dict = config["trainer"]
    buffer_cfg: dict = config.get("buffer") or {}
    conv = _convert(ae, trainer_cfg)
    d_in, d_sae = conv.weights["W_enc"].shape
    arch = conv.architecture
    if architecture == MATRYOSHKA_ARCHITECTURE:
        if arch == "topk":
            raise ValueError("a per-token TopK SAE cannot be exported as matryoshka_jumprelu; use architecture='auto'")
        if arch == "standard":  # ReLU == JumpReLU with threshold 0
            conv.weights["threshold"] = torch.zeros(d_sae)
        arch = MATRYOSHKA_ARCHITECTURE

    lm_name = trainer_cfg.get("lm_name")
    if hook_name is None:
        try:
            hook_name = tl_hook_name(trainer_cfg.get("submodule_name"), buffer_cfg.get("io", "out"),
                                     trainer_cfg.get("layer"), lm_name)
        except ValueError as e:
            raise ValueError(f"{src}: {e}") from None
    if context_size is None and buffer_cfg.get("ctx_len") is not None:
        context_size = int(buffer_cfg["ctx_len"])

    sparsity = None
    if firing_frequencies is not None:
        freq = torch.as_tensor(firing_frequencies).detach().cpu().reshape(-1).to(torch.float64)
        if freq.numel() != d_sae or not bool(((freq >= 0) & (freq <= 1)).all()):
            raise ValueError(f"firing_frequencies must be {d_sae} values in [0, 1], got shape {tuple(freq.shape)}")
        sparsity = _log_sparsity(freq)
    elif activations is not None:
        counts, n_tokens = _firing_counts(ae, activations)
        sparsity = _log_sparsity(counts / n_tokens)

    details = {**trainer_cfg}
    if conv.widths is not None:
        details["matryoshka_widths"] = conv.widths
    if conv.k is not None:
        details["k"] = conv.k
    metadata: dict[str, Any] = {
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
        "dictionary_learning_buffer": buffer_cfg,
        **dict(extra_metadata or {}),
        "exported_by": f"{PACKAGE_MARK} {_version()}",  # the mark that lets overwrite=True replace it
    }
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
    weights = {k: v.to(_DTYPES[dtype]) for k, v in conv.weights.items()}
    probe = _probe_inputs(conv, activations)

    def write(tmp: Path) -> None:
        _write_safetensors(tmp / SAE_WEIGHTS_FILENAME, weights)
        if sparsity is not None:
            _write_safetensors(tmp / SPARSITY_FILENAME, {"sparsity": sparsity})
        # cfg.json last: a folder without it is never mistaken for a SAELens SAE.
        _write_json(tmp / SAE_CFG_FILENAME, cfg)
        if verify:
            _verify(tmp, ae, probe, dtype)

    return _write_folder_atomically(out_dir, overwrite, write, _EXPORT)


def _probe_inputs(conv: _Converted, activations: torch.Tensor | None) -> torch.Tensor:
    d = conv.weights["W_enc"].shape[0]
    if activations is not None:
        return activations.reshape(-1, d)[:256].detach().cpu().float()
    # Inputs along decoder directions (plus b_dec), so threshold SAEs have some active latents.
    g = torch.Generator().manual_seed(0)
    W_dec = conv.weights["W_dec"]
    mix = torch.rand(64, W_dec.shape[0], generator=g) * (torch.rand(64, W_dec.shape[0], generator=g) < 0.1)
    return mix @ W_dec + conv.weights["b_dec"] + 0.1 * torch.randn(64, d, generator=g)


def _version() -> str:
    from . import __version__

    return __version__


# ----------------------------------------------------------------------------------------------
# Loading as the registered architecture, and import into this package's classes
# ----------------------------------------------------------------------------------------------


def _widths_from_metadata(meta: Mapping[str, Any] | SAEMetadata | None) -> list[int] | None:
    if meta is None:
        return None
    get = meta.get
    widths = get("matryoshka_widths")
    if widths is None:
        details = get("training_architecture_details") or {}
        widths = details.get("matryoshka_widths") if isinstance(details, Mapping) else None
    return None if widths is None else [int(w) for w in widths]


def _k_from_metadata(meta: Mapping[str, Any] | SAEMetadata | None) -> Any:
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
    _check_saelens_folder(path)
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
        widths = cfg_dict.get("matryoshka_widths") or _widths_from_metadata(cfg_dict.get("metadata"))
    cfg_dict = {**cfg_dict, "architecture": MATRYOSHKA_ARCHITECTURE, "matryoshka_widths": list(widths or [])}
    try:
        cfg = MatryoshkaJumpReLUSAEConfig.from_dict(cfg_dict)
        sae = MatryoshkaJumpReLUSAE(cfg)
        sae.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path} does not hold a valid SAE: {e}") from None
    return sae


def _check_saelens_folder(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"no such SAELens folder: {path}")
    for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME):
        if not (path / name).is_file():
            raise CheckpointError(f"missing {name} in {path}; is it a SAELens SAE folder?")


def _load_stock(path: Path, device: str) -> SAE:
    _check_saelens_folder(path)
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
        sae = _load_stock(Path(source), "cpu")
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
        widths = getattr(cfg, "matryoshka_widths", None) or _widths_from_metadata(meta)
    if arch in ("jumprelu", MATRYOSHKA_ARCHITECTURE):
        thr = sae.threshold.detach().to("cpu", torch.float32).reshape(-1)
        if not bool((thr == thr[0]).all()):
            raise CheckpointError(
                f"{origin} has per-latent thresholds ({float(thr.min()):.4g} .. {float(thr.max()):.4g}); "
                "MatryoshkaBatchTopKSAE has one threshold shared by all latents"
            )
        if k is None:
            k = _k_from_metadata(meta)
        if k is None:
            raise CheckpointError(
                f"{origin} does not record k (the BatchTopK target L0); pass k= (it only matters for training)"
            )
        if isinstance(k, float) and not k.is_integer():
            raise CheckpointError(f"{origin} records a non-integer k={k}; pass an integer k=")
        try:
            group_sizes = torch.diff(torch.tensor([0] + _check_widths(widths, n))).tolist()
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

    def write(tmp: Path) -> None:
        atomic_torch_save(state, tmp / "ae.pt")
        _write_json(tmp / "config.json", config)

    _write_folder_atomically(out_dir, overwrite, write, _IMPORT)


# ----------------------------------------------------------------------------------------------
# Publishing
# ----------------------------------------------------------------------------------------------


@dataclass
class PublishPlan:
    """What :func:`publish_to_huggingface` uploads (or would, with ``dry_run``)."""

    repo_id: str
    revision: str
    staging_dir: Path | None  # None once an upload without a given staging_dir has finished
    sae_ids: list[str]
    load_lines: list[str]  # the code users run: SAE.from_pretrained("org/repo", "sae_id")
    uploaded: bool


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_sae_id(sae_id: str) -> None:
    parts = str(sae_id).split("/")
    if not sae_id or any(p in ("", ".", "..") for p in parts) or "\\" in sae_id or sae_id.startswith("."):
        raise ValueError(f"invalid sae_id {sae_id!r}: use a relative path inside the repo, like 'blocks.12.hook_resid_post'")


def _stage(folders: Mapping[str, str | Path], staging: Path) -> None:
    for sae_id, folder in folders.items():
        dst = staging / sae_id
        dst.mkdir(parents=True, exist_ok=False)
        for name in _PUBLISHED_FILES:
            src = Path(folder) / name
            if src.is_file():
                try:
                    os.link(src, dst / name)  # no copy of large weight files where possible
                except OSError:
                    shutil.copy2(src, dst / name)


def publish_to_huggingface(
    folders: Mapping[str, str | Path],
    repo_id: str,
    *,
    revision: str = "main",
    dry_run: bool = False,
    staging_dir: str | Path | None = None,
    verify: bool = True,
    show_progress: bool = True,
    add_default_readme: bool = True,
) -> PublishPlan:
    """Upload exported SAELens folders to the Hugging Face Hub with SAELens' own
    ``upload_saes_to_huggingface``. Users then load them with stock SAELens::

        from sae_lens import SAE
        sae = SAE.from_pretrained("org/repo", "blocks.12.hook_resid_post")

    Args:
        folders: ``{sae_id: exported folder}``; each ``sae_id`` becomes a folder in the repo.
        repo_id: ``"org/repo"`` (created if missing; needs ``huggingface-cli login``).
        dry_run: only build the staging folder (``staging_dir/<sae_id>/cfg.json`` ...), exactly the
            tree that is uploaded, and return the plan without any network access.
        staging_dir: where to stage (must not exist or be empty); a temporary folder otherwise,
            removed after an upload and kept after a dry run.
        verify: first load every folder with stock ``SAE.load_from_disk``.
    """
    if not _REPO_ID.match(str(repo_id)):
        raise ValueError(f"repo_id must look like 'org/repo', got {repo_id!r}")
    if not folders:
        raise ValueError("no SAE folders to publish")
    for sae_id, folder in folders.items():
        _check_sae_id(sae_id)
        folder = Path(folder)
        _check_saelens_folder(folder)
        arch = json.loads((folder / SAE_CFG_FILENAME).read_text()).get("architecture")
        if arch == MATRYOSHKA_ARCHITECTURE:
            raise ValueError(
                f"{folder} uses the {MATRYOSHKA_ARCHITECTURE!r} architecture, which stock SAELens cannot load; "
                "publish a default export (architecture='auto')"
            )
        if verify:
            _load_stock(folder, "cpu")
    ids = sorted(folders)
    flat = [i for i in ids if any(j.startswith(i + "/") for j in ids)]
    if flat:
        raise ValueError(f"sae_ids {flat} are prefixes of other sae_ids' folders")
    load_lines = [f'SAE.from_pretrained("{repo_id}", "{sae_id}")' for sae_id in folders]

    own_tmp = staging_dir is None
    staging = Path(tempfile.mkdtemp(prefix="saelens-publish-")) if own_tmp else Path(staging_dir)
    if not own_tmp:
        _check_out_dir(staging, overwrite=False)
        staging.mkdir(parents=True, exist_ok=True)
    try:
        _stage(folders, staging)
        if dry_run:
            return PublishPlan(str(repo_id), revision, staging, list(folders), load_lines, uploaded=False)
        from sae_lens import upload_saes_to_huggingface

        upload_saes_to_huggingface(
            {sae_id: staging / sae_id for sae_id in folders},
            str(repo_id),
            hf_revision=revision,
            show_progress=show_progress,
            add_default_readme=add_default_readme,
        )
    except BaseException:
        if own_tmp:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if own_tmp:
        shutil.rmtree(staging, ignore_errors=True)
    return PublishPlan(str(repo_id), revision, None if own_tmp else staging, list(folders), load_lines, uploaded=True)
