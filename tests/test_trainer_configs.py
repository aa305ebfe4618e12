"""Typed trainer configs: validation, attributes, config.json keys, and folders written before them.

tests/data/folders_v0_1_0 holds two trainSAE folders written by matryoshka_plugin 0.1.0 before
the trainers took typed configs (d=8, 32 latents, 40 steps, a checkpoint at step 20).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch

from matryoshka_plugin import (
    MatryoshkaBatchTopKTrainer,
    MatryoshkaLogSparsityTrainer,
    export_to_saelens,
    load_dictionary,
)
from matryoshka_plugin.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKConfig, StepOutput
from matryoshka_plugin.trainers.matryoshka_log_sparsity import MatryoshkaLogSparsityConfig

LEGACY = Path(__file__).parent / "data" / "folders_v0_1_0"
# Keys the log-sparsity trainer gained with its language-model defaults.
NEW_LOG_SPARSITY_KEYS = {"controller_log_range", "normalize_decoder", "dead_feature_threshold", "resample_dead"}
# Options the BatchTopK trainer gained (per-level AuxK, detached levels, reordering, k annealing, b_dec start).
NEW_BATCH_TOP_K_KEYS = {"matryoshka_aux_loss", "detach_inner_levels", "reorder_by", "reorder_decay", "k_anneal_steps",
                        "b_dec_init"}


def same_settings(trainer_cfg: dict) -> dict:
    keep = {"steps", "activation_dim", "dict_size", "k", "group_fractions", "warmup_steps", "threshold_start_step",
            "seed", "device", "layer", "lm_name", "target_l0"}
    return {k: v for k, v in trainer_cfg.items() if k in keep}


@pytest.mark.parametrize("i, cls", [(0, MatryoshkaBatchTopKTrainer), (1, MatryoshkaLogSparsityTrainer)])
def test_config_json_keeps_its_keys(i, cls):
    old = json.loads((LEGACY / f"trainer_{i}" / "config.json").read_text())["trainer"]
    new = cls(**same_settings(old)).config
    expected = set(old) | (NEW_LOG_SPARSITY_KEYS if cls is MatryoshkaLogSparsityTrainer else NEW_BATCH_TOP_K_KEYS)
    assert set(new) == expected
    # Defaults the log-sparsity trainer changed for language-model activations (docs/real_model.md).
    changed = {"package_version"} | ({"controller_rate", "lr"} if cls is MatryoshkaLogSparsityTrainer else set())
    for key, value in old.items():
        if key not in changed:
            assert json.loads(json.dumps(new[key])) == value, key


@pytest.mark.parametrize("i", [0, 1])
def test_folders_written_before_still_load_and_export(i, tmp_path):
    folder = LEGACY / f"trainer_{i}"
    ae, cfg = load_dictionary(folder)
    latest, _ = load_dictionary(folder, checkpoint="latest")
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert ae(x).shape == (16, 8) and latest(x).shape == (16, 8)
    state = torch.load(folder / "ae.pt", weights_only=True)
    assert torch.equal(ae.W_dec.detach(), state["W_dec"])
    out = export_to_saelens(folder, tmp_path / "export", hook_name="blocks.1.hook_resid_post", model_name="toy")
    assert (out / "cfg.json").is_file()


def test_settings_are_validated_typed_and_read_back_as_attributes():
    tr = MatryoshkaBatchTopKTrainer(steps=100, activation_dim=8, dict_size=32, k=3, group_fractions=[0.25, 0.75],
                                    warmup_steps=5, device="cpu")
    assert isinstance(tr.cfg, MatryoshkaBatchTopKConfig)
    assert (tr.cfg.k, tr.cfg.group_sizes, tr.cfg.top_k_aux) == (3, [8, 24], 4)
    assert tr.cfg.lr == tr.lr == pytest.approx(2e-4 / (32 / 2**14) ** 0.5)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        tr.nonexistent
    with pytest.raises(TypeError, match="unexpected keyword argument 'kk'"):
        MatryoshkaBatchTopKTrainer(steps=100, activation_dim=8, dict_size=32, kk=3)
    with pytest.raises(ValueError, match="k must be an integer"):
        MatryoshkaBatchTopKTrainer(steps=100, activation_dim=8, dict_size=32, k=64, group_fractions=[1.0])
    ls = MatryoshkaLogSparsityTrainer(steps=100, activation_dim=8, dict_size=32, target_l0=3, warmup_steps=5, device="cpu")
    assert isinstance(ls.cfg, MatryoshkaLogSparsityConfig) and ls.cfg.betas == (0.5, 0.9375)
    assert ls.cfg.controller_rate == pytest.approx(8.0 / 80)


# What dictionary_learning's SAETrainer contract and its trainers carry as attributes.
UPSTREAM_ATTRIBUTES = ("steps", "lr", "device", "layer", "lm_name", "submodule_name", "wandb_name", "seed")


def test_settings_are_not_forwarded_but_upstreams_attributes_are_kept():
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer as Upstream

    settings = dict(steps=100, activation_dim=8, dict_size=32, k=3, group_fractions=[0.25, 0.75], warmup_steps=5,
                    lr=1e-3, device="cpu", layer=2, lm_name="m", submodule_name="s", seed=4, wandb_name="w")
    ours, upstream = MatryoshkaBatchTopKTrainer(**settings), Upstream(**settings)
    for name in UPSTREAM_ATTRIBUTES:
        assert getattr(ours, name) == getattr(upstream, name), name
    for name in ("k", "group_sizes", "auxk_alpha", "backend", "top_k_aux"):  # settings live in cfg only
        assert not hasattr(ours, name) and hasattr(ours.cfg, name), name
    with pytest.raises(AttributeError):
        ours.steps = 5  # read-only: a changed copy would disagree with cfg
    ls = MatryoshkaLogSparsityTrainer(steps=100, activation_dim=8, dict_size=32, target_l0=3, device="cpu", seed=1)
    assert (ls.steps, ls.lr, ls.seed) == (100, ls.cfg.lr, 1) and not hasattr(ls, "target_l0")


@pytest.mark.parametrize("config", [MatryoshkaBatchTopKConfig, MatryoshkaLogSparsityConfig])
def test_every_setting_is_documented_and_in_the_signature(config):
    source = inspect.getsource(config) + inspect.getsource(config.__mro__[1])
    trainer = {MatryoshkaBatchTopKConfig: MatryoshkaBatchTopKTrainer,
               MatryoshkaLogSparsityConfig: MatryoshkaLogSparsityTrainer}[config]
    params = inspect.signature(trainer).parameters
    for f in dataclasses.fields(config):
        # a field's docstring is the string literal right after its annotation
        assert f'{f.name}:' in source and f'"""' in source.split(f"    {f.name}:", 1)[1].split("\n", 2)[1], f.name
        assert (f.name in params) == f.init, f.name


def test_the_training_step_is_a_named_tuple():
    tr = MatryoshkaBatchTopKTrainer(steps=100, activation_dim=8, dict_size=32, k=3, group_fractions=[0.25, 0.75],
                                    warmup_steps=5, device="cpu")
    out = tr._forward(torch.randn(16, 8), 0, training=False)
    assert isinstance(out, StepOutput) and out.loss.ndim == 0 and out.dead.shape == (32,)
    assert set(out.parts) == {"l2_loss", "auxk_loss"}


def _warms_up_for(trainer, warmup: int) -> bool:
    """The learning-rate factor is below 1 until step ``warmup`` and 1 from there."""
    schedule = trainer.scheduler.lr_lambdas[0]
    return (warmup == 0 or schedule(warmup - 1) < 1.0) and schedule(warmup) == 1.0


@pytest.mark.parametrize("steps, warmup", [(1, 0), (20, 2), (100, 10), (500, 50), (5000, 100)])
def test_log_sparsity_warmup_default_scales_to_the_run(steps, warmup):
    tr = MatryoshkaLogSparsityTrainer(steps=steps, activation_dim=8, dict_size=32, target_l0=3, device="cpu")
    assert tr.cfg.warmup_steps == warmup and tr.config["warmup_steps"] == warmup and _warms_up_for(tr, warmup)


@pytest.mark.parametrize("steps, extra, warmup", [
    (100, {}, 10), (1000, {}, 100), (1001, {}, 1000), (5000, {}, 1000),  # dictionary_learning's 1000 where it runs
    (100, dict(decay_start=5), 4), (5000, dict(decay_start=600), 599),
])
def test_batch_top_k_warmup_default_scales_to_the_run(steps, extra, warmup):
    tr = MatryoshkaBatchTopKTrainer(steps=steps, activation_dim=8, dict_size=32, k=3, group_fractions=[1.0],
                                    device="cpu", **extra)
    assert tr.cfg.warmup_steps == warmup and tr.config["warmup_steps"] == warmup and _warms_up_for(tr, warmup)


@pytest.mark.parametrize("cls, extra", [(MatryoshkaLogSparsityTrainer, dict(target_l0=3)),
                                        (MatryoshkaBatchTopKTrainer, dict(k=3, group_fractions=[1.0]))])
@pytest.mark.parametrize("warmup", [50, 80, -1, 2.5])
def test_an_explicit_warmup_is_still_checked_and_named(cls, extra, warmup):
    with pytest.raises(ValueError, match="warmup_steps must"):
        cls(steps=50, activation_dim=8, dict_size=32, warmup_steps=warmup, device="cpu", **extra)


@pytest.mark.parametrize("target", [33, 1e9, 0, -2.0, float("nan"), True])
def test_target_l0_must_lie_between_zero_and_dict_size(target):
    with pytest.raises(ValueError, match=r"target_l0 must lie in \(0, dict_size=32\]"):
        MatryoshkaLogSparsityTrainer(steps=50, activation_dim=8, dict_size=32, target_l0=target, device="cpu")
    assert MatryoshkaLogSparsityTrainer(steps=50, activation_dim=8, dict_size=32, target_l0=32, device="cpu").cfg.target_l0 == 32


@pytest.mark.parametrize("cls, extra", [(MatryoshkaLogSparsityTrainer, dict(target_l0=3)),
                                        (MatryoshkaBatchTopKTrainer, dict(k=3, group_fractions=[1.0]))])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_cuda_device_without_cuda_is_named(cls, extra, device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=rf"device='{device}', but this torch .* has no CUDA"):
        cls(steps=50, activation_dim=8, dict_size=32, device=device, **extra)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device='cuda:3', but torch sees 1 CUDA device"):
        cls(steps=50, activation_dim=8, dict_size=32, device="cuda:3", **extra)
    with pytest.raises(ValueError, match=r"device='gpu' is not a torch device"):
        cls(steps=50, activation_dim=8, dict_size=32, device="gpu", **extra)
