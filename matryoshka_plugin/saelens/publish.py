"""Publishing exported SAELens folders to the Hugging Face Hub with SAELens' own uploader."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from sae_lens.constants import SAE_CFG_FILENAME

from ..io import check_out_dir
from .architecture import MATRYOSHKA_ARCHITECTURE
from .export import SAELENS_FILES
from .load import check_saelens_folder, load_stock_sae

__all__ = ["PublishPlan", "publish_to_huggingface"]


@dataclass
class PublishPlan:
    """What :func:`publish_to_huggingface` uploads (or would, with ``dry_run``)."""

    repo_id: str
    """The Hub repository, ``"org/repo"``."""
    revision: str
    """The branch (or other revision) uploaded to."""
    staging_dir: Path | None
    """The staged tree (``<sae_id>/cfg.json`` ...); ``None`` once an upload without a given
    ``staging_dir`` has finished and removed its temporary one."""
    sae_ids: list[str]
    """The folders in the repo, one per SAE."""
    load_lines: list[str]
    """The code users run to load each SAE: ``SAE.from_pretrained("org/repo", "sae_id")``."""
    uploaded: bool
    """False for a dry run."""


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_sae_id(sae_id: str) -> None:
    parts = str(sae_id).split("/")
    if not sae_id or any(p in ("", ".", "..") for p in parts) or "\\" in sae_id or sae_id.startswith("."):
        raise ValueError(f"invalid sae_id {sae_id!r}: use a relative path inside the repo, like 'blocks.12.hook_resid_post'")


def _stage(folders: Mapping[str, str | Path], staging: Path) -> None:
    for sae_id, folder in folders.items():
        dst = staging / sae_id
        dst.mkdir(parents=True, exist_ok=False)
        for name in SAELENS_FILES:
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
        check_saelens_folder(folder)
        arch = json.loads((folder / SAE_CFG_FILENAME).read_text()).get("architecture")
        if arch == MATRYOSHKA_ARCHITECTURE:
            raise ValueError(
                f"{folder} uses the {MATRYOSHKA_ARCHITECTURE!r} architecture, which stock SAELens cannot load; "
                "publish a default export (architecture='auto')"
            )
        if verify:
            load_stock_sae(folder, "cpu")
    ids = sorted(folders)
    flat = [i for i in ids if any(j.startswith(i + "/") for j in ids)]
    if flat:
        raise ValueError(f"sae_ids {flat} are prefixes of other sae_ids' folders")
    load_lines = [f'SAE.from_pretrained("{repo_id}", "{sae_id}")' for sae_id in folders]

    own_tmp = staging_dir is None
    staging = Path(tempfile.mkdtemp(prefix="saelens-publish-")) if own_tmp else Path(staging_dir)
    if not own_tmp:
        check_out_dir(staging, overwrite=False)
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
