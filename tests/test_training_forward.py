"""One training step in one direction (issue 27, item 8): the SAEs' training forward passes against
dense brute force, and the walk of one ``update`` through the modules (scripts/step_walk.py)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from matryoshka_plugin.prefixes import PrefixSampler
from matryoshka_plugin.sae import MatryoshkaBatchTopKSAE, MatryoshkaLogSparsitySAE

ROOT = Path(__file__).resolve().parents[1]


def _sae(seed=0, d=8, n=32, k=3):
    torch.manual_seed(seed)
    sae = MatryoshkaBatchTopKSAE(d, n, k, [8, 24])
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    return sae


def _dense_weights(sae, x):
    """Dense ReLU pre-activations with autograd through every weight (the brute-force reference)."""
    return torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)


def _grads(sae, loss):
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_batch_topk_training_forward_matches_dense_brute_force(backend):
    sae, x = _sae(), torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    weights = PrefixSampler("groups", 32, group_sizes=[8, 24]).expected()
    out = sae.training_forward(x, weights, backend)
    pre = _dense_weights(sae, x)
    top = torch.topk(pre.detach().flatten(), 3 * 10).indices
    mask = torch.zeros(pre.numel(), dtype=torch.bool)
    mask[top] = True
    f = pre * mask.view_as(pre)
    torch.testing.assert_close(out.pre_activations, pre.detach())
    torch.testing.assert_close(out.latents.to_dense(), f)
    # the fixed-groups loss: lam-weighted squared error of each nested prefix, mean over tokens
    want = sum(float(weights.lam[e]) * (x - (f[:, :e] @ sae.W_dec[:e] + sae.b_dec)).pow(2).sum(-1).mean()
               for e in (8, 32))
    torch.testing.assert_close(out.recon.loss, want)
    torch.testing.assert_close(out.recon.residual, (x - f @ sae.W_dec - sae.b_dec).detach())
    for got, ref in zip(_grads(sae, out.recon.loss), _grads(sae, want)):
        torch.testing.assert_close(got, ref)


def test_dead_latent_decode_matches_dense_brute_force():
    sae, x = _sae(), torch.randn(10, 8, generator=torch.Generator().manual_seed(2))
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 5, 9, 20, 30, 31]] = True
    with torch.no_grad():
        pre = _dense_weights(sae, x)
    got = sae.dead_latent_decode(x, pre, dead, 2, "torch")
    dense = _dense_weights(sae, x)
    keep = torch.zeros_like(dense, dtype=torch.bool)
    for row in range(10):  # each token's two largest pre-activations among the dead latents
        cand = torch.where(dead, dense[row].detach(), torch.tensor(float("-inf")))
        keep[row, torch.topk(cand, 2).indices] = True
    want = (dense * keep) @ sae.W_dec
    torch.testing.assert_close(got, want)
    target = torch.randn(10, 8, generator=torch.Generator().manual_seed(3))
    for g, r in zip(_grads(sae, (got - target).pow(2).sum()), _grads(sae, (want - target).pow(2).sum())):
        torch.testing.assert_close(g, r)


def test_log_sparsity_training_forward_matches_dense_brute_force():
    torch.manual_seed(0)
    sae, x = MatryoshkaLogSparsitySAE(8, 16), torch.randn(6, 8)
    weights = PrefixSampler("every", 16).expected()
    out = sae.training_forward(x, weights, "torch")
    a = torch.relu(x @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(out.activations, a)
    torch.testing.assert_close(out.magnitudes, a * sae.W_dec.norm(dim=1))
    want = sum(float(weights.lam[m]) * (x - (a[:, :m] @ sae.W_dec[:m] + sae.b_dec)).pow(2).sum(-1).mean()
               for m in range(17))
    torch.testing.assert_close(out.recon.loss, want)


def _step_walk():
    spec = importlib.util.spec_from_file_location("step_walk", ROOT / "scripts" / "step_walk.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_climbs_count_ping_pong_but_not_handing_down():
    walk = _step_walk()
    # the SAE taking the encoding back and calling the encoder module again: one climb each time
    assert walk.climbs(["trainers", "sae", "sparse_encoder", "sae", "sparse_encoder", "sae", "trainers"]) == 1
    # the SAE handing the encoding down to the loss, and calls into leaves: none
    assert walk.climbs(["trainers", "sae", "sparse_encoder", "sparse_latents", "sparse_encoder", "sae",
                        "prefix_loss", "kernels", "prefix_loss", "sae", "trainers"]) == 0


def test_one_update_walks_down_once():
    """Neither trainer's update climbs back up (before: the BatchTopK SAE called sparse_encoder
    three times from its training encoder, and the trainer ran the encoder's backward itself)."""
    from matryoshka_plugin.trainers import MatryoshkaBatchTopKTrainer, MatryoshkaLogSparsityTrainer

    walk = _step_walk()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    common = dict(steps=10, activation_dim=8, dict_size=32, device="cpu", seed=0, backend="torch")
    for trainer in (MatryoshkaBatchTopKTrainer(k=3, group_fractions=[0.25, 0.75], dead_feature_threshold=1, **common),
                    MatryoshkaLogSparsityTrainer(target_l0=3, **common)):
        trainer.update(0, x)
        modules = [m for m, _ in walk.walk(trainer, 1, x)]
        assert walk.climbs(modules) == 0, modules
        assert "sae" in modules and "prefix_loss" in modules
        # the trainer asks the SAE: it calls neither the loss nor the encoder's entries itself
        stays = walk.walk(trainer, 2, x)
        for (before, _), (module, functions) in zip(stays, stays[1:]):
            if before == "trainers":
                assert module != "prefix_loss", stays
                if module == "sparse_encoder":  # its dtype rule, and autograd running its backward
                    assert set(functions) <= {"encoder_matmul_dtype", "backward"}, stays
