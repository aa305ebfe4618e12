"""SAE references: what an SAE is (read from its metadata, no weights), the checks that a set of
them fits one run, and turning a reference into the SAELens ``SAE`` SAEBench gets.

A source is a ``trainer_i`` folder written by ``trainSAE``, a SAELens folder (``cfg.json``),
``("saelens", release, sae_id)`` / ``"saelens:RELEASE:SAE_ID"`` (SAELens' pretrained directory),
or a SAELens ``SAE`` object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..errors import CheckpointError, SAEBenchError
from ..io import read_json, read_json_object
from ..registry import architecture_for
from .results import check_sae_name

_RELEASE_SPEC = "saelens:"
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_[A-Za-z_]+$")
_RESIDUAL_HOOK = re.compile(r"^blocks\.\d+\.hook_resid_post$")


@dataclass(frozen=True)
class SAERef:
    """What an SAE is, read from its metadata without loading weights."""

    name: str
    """The name results are filed under."""
    kind: str
    """``"trainer_folder"``, ``"saelens_folder"``, ``"saelens_release"`` or ``"object"``."""
    source: Any
    """A folder ``Path``, ``(release, sae_id)`` or the SAE object."""
    model_name: str | None
    """The TransformerLens model name the SAE was trained on."""
    hook_name: str | None
    """The TransformerLens hook (``blocks.12.hook_resid_post``)."""
    hook_layer: int | None
    """The hook's layer."""
    d_in: int | None
    """Input width (None for releases: not known without loading)."""
    d_sae: int | None
    """Number of latents (None for releases)."""
    architecture: str | None = None
    """Training architecture (``matryoshka_batchtopk``, ``batchtopk``, ...) where recorded."""
    k: int | None = None
    """Target L0 of top-k architectures where recorded."""

    def describe(self) -> str:
        """One line naming the SAE, where it comes from, its model and hook (for error messages)."""
        where = f"{self.source[0]}/{self.source[1]}" if self.kind == "saelens_release" else str(self.source)
        if self.kind == "object":
            where = type(self.source).__name__
        return f"{self.name} ({self.kind} {where}: model {self.model_name}, hook {self.hook_name})"


def training_architecture(trainer_cfg: Mapping[str, Any]) -> str:
    """The training architecture of a ``trainSAE`` folder, from its ``config["trainer"]``."""
    arch = architecture_for(trainer_cfg)
    return arch.label if arch is not None else str(trainer_cfg.get("dict_class", "")) or "unknown"


def _check_name(name: str) -> str:
    return check_sae_name(name)


def _layer_of(hook_name: str | None) -> int | None:
    if hook_name is None:
        return None
    m = re.search(r"\d+", hook_name)  # what SAEBench's _standardize_sae_cfg does
    return int(m.group(0)) if m else None


def _is_release_tuple(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 3 and x[0] == "saelens"


def _parse_release_spec(source: Any) -> tuple[str, str] | None:
    if _is_release_tuple(source):
        return str(source[1]), str(source[2])
    if isinstance(source, str) and source.startswith(_RELEASE_SPEC):
        rest = source[len(_RELEASE_SPEC) :]
        release, sep, sae_id = rest.partition(":")
        if not sep or not release or not sae_id:
            raise SAEBenchError(f"expected 'saelens:RELEASE:SAE_ID', got {source!r}")
        return release, sae_id
    return None


def _describe_release(release: str, sae_id: str, name: str | None) -> SAERef:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise SAEBenchError(f"SAELens has no pretrained release {release!r} (see sae_lens' pretrained_saes.yaml)")
    entry = directory[release]
    if sae_id not in entry.saes_map:
        examples = sorted(entry.saes_map)[:5]
        raise SAEBenchError(f"release {release!r} has no SAE {sae_id!r}; e.g. {examples}")
    hook = sae_id.split("__")[0]
    hook = hook if _HOOK.match(hook) else None
    return SAERef(
        name=_check_name(f"{release}__{sae_id}".replace("/", "_") if name is None else name),
        kind="saelens_release",
        source=(release, sae_id),
        model_name=entry.model,
        hook_name=hook,
        hook_layer=_layer_of(hook),
        d_in=None,
        d_sae=None,
    )


def _describe_object(source: torch.nn.Module, name: str | None) -> SAERef:
    cfg = getattr(source, "cfg", None)
    if cfg is None or not hasattr(cfg, "d_sae"):
        raise SAEBenchError(
            f"{type(source).__name__} is not a SAELens SAE; pass its trainer folder, or export it with "
            "matryoshka_plugin.export_to_saelens"
        )
    meta = getattr(cfg, "metadata", None)
    hook = getattr(meta, "hook_name", None) or getattr(cfg, "hook_name", None)
    return SAERef(
        name=_check_name("sae" if name is None else name),
        kind="object",
        source=source,
        model_name=getattr(meta, "model_name", None) or getattr(cfg, "model_name", None),
        hook_name=hook,
        hook_layer=getattr(meta, "hook_layer", None) or _layer_of(hook),
        d_in=int(cfg.d_in),
        d_sae=int(cfg.d_sae),
        architecture=getattr(meta, "training_architecture", None),
    )


def _describe_saelens_folder(folder: Path, name: str) -> SAERef:
    cfg = read_json(folder / "cfg.json")
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


def _describe_trainer_folder(folder: Path, name: str) -> SAERef:
    from ..checkpoints import read_config
    from ..hook_names import tl_hook_name, tl_model_name

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
        architecture=training_architecture(tr),
        k=tr.get("k"),
    )


def describe_sae(source: Any, name: str | None = None) -> SAERef:
    """Read what an SAE is (model, hook, widths) from its metadata; loads no weights.

    ``source``: a ``trainer_i`` folder, a SAELens folder, ``("saelens", release, sae_id)`` /
    ``"saelens:RELEASE:SAE_ID"``, or a SAELens ``SAE`` object. Raises :class:`SAEBenchError` or
    :class:`~matryoshka_plugin.CheckpointError` (missing folders, unreadable configs).
    """
    release = _parse_release_spec(source)
    if release is not None:
        return _describe_release(*release, name)
    if isinstance(source, torch.nn.Module):
        return _describe_object(source, name)
    if not isinstance(source, (str, os.PathLike)):
        raise SAEBenchError(f"cannot use {type(source).__name__} as an SAE; give a folder, a SAELens release or SAE")
    folder = Path(source)
    if not folder.is_dir():
        raise SAEBenchError(f"no such SAE folder: {folder}")
    name = _check_name(folder.name if name is None else name)
    if (folder / "cfg.json").is_file():
        return _describe_saelens_folder(folder, name)
    if (folder / "config.json").is_file():
        return _describe_trainer_folder(folder, name)
    raise SAEBenchError(f"{folder} is neither a trainSAE folder (config.json + ae.pt) nor a SAELens folder (cfg.json)")


def named_sources(saes: Any) -> list[tuple[str | None, Any]]:
    """``(name or None, source)`` pairs from ``run_saebench``'s ``saes`` argument (a mapping, one
    source, or a list of sources and ``(name, source)`` pairs)."""
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
        bad = [r for r in refs if r.hook_name is not None and not _RESIDUAL_HOOK.match(r.hook_name)]
        if bad:
            raise SAEBenchError(
                "absorption trains its first-letter probes on blocks.N.hook_resid_post only; not on "
                + "; ".join(r.describe() for r in bad)
            )
    return str(model_name)


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
    from ..saelens import export_to_saelens

    src = Path(ref.source)
    out = Path(cache_dir) / check_sae_name(ref.name)  # an SAERef can be built by hand
    digest = _sha256(src / "ae.pt")
    cfg_path = out / "cfg.json"
    if cfg_path.is_file():
        meta = read_json_object(cfg_path).get("metadata") or {}
        if isinstance(meta, dict) and meta.get("source_sha256") == digest:
            return dataclasses.replace(describe_sae(out, ref.name), architecture=ref.architecture, k=ref.k)
    export_to_saelens(src, out, extra_metadata={"source_folder": str(src.resolve()), "source_sha256": digest},
                      overwrite=True)
    return dataclasses.replace(describe_sae(out, ref.name), architecture=ref.architecture, k=ref.k)


def load_sae(ref: SAERef | Any, device: str = "cpu", cache_dir: str | Path | None = None) -> Any:
    """A SAELens ``SAE`` for any accepted source (see :func:`describe_sae`)."""
    from sae_lens import SAE

    if not isinstance(ref, SAERef):
        ref = describe_sae(ref)
    if ref.kind == "trainer_folder":
        if cache_dir is None:
            raise SAEBenchError("loading a trainer folder for SAEBench needs cache_dir= (where to export it)")
        ref = prepare_sae(ref, cache_dir)
    if ref.kind == "saelens_folder":
        from ..saelens import register_saelens_architecture

        register_saelens_architecture()  # the folder may hold a matryoshka_jumprelu export
        return SAE.load_from_disk(str(ref.source), device=device)
    if ref.kind == "saelens_release":
        # What SAEBench does for its own string ids of pretrained SAEs.
        sae = SAE.from_pretrained(ref.source[0], ref.source[1], device=device)
        with contextlib.suppress(NotImplementedError):
            sae.fold_W_dec_norm()
        return sae
    return ref.source.to(device)
