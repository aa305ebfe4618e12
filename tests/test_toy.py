"""Toy feature trees, ground-truth metrics on hand-built SAEs, and the demo command."""

import json

import numpy as np
import pytest
import torch

from matryoshka_plugin import MatryoshkaBatchTopKSAE
from matryoshka_plugin.__main__ import main
from matryoshka_plugin.toy import Feature, ToyModel, evaluate_sae


def test_post_tree_statistics():
    toy = ToyModel.post_tree()
    feats = toy.sample_features(200_000, torch.Generator().manual_seed(0))
    assert toy.n_features == 20 and toy.expected_l0() == pytest.approx(1.12, abs=0.01)
    for parent, children in toy.parent_child_groups():
        assert feats[:, parent].mean() == pytest.approx(0.15, abs=0.005)
        kids = feats[:, children]
        assert torch.all(kids.sum(1) <= 1)  # mutually exclusive
        assert torch.all(kids.sum(1)[feats[:, parent] == 0] == 0)  # only with the parent
        on = feats[:, parent] > 0
        np.testing.assert_allclose(kids[on].mean(0).numpy(), [0.2] * 3, atol=0.01)
    torch.testing.assert_close(toy.unit_directions @ toy.unit_directions.T, torch.eye(20), atol=1e-5, rtol=0)


def test_non_exclusive_children_and_validation():
    toy = ToyModel([Feature(0.5, [Feature(0.5), Feature(0.5)])], d=5)
    f = toy.sample_features(50_000, torch.Generator().manual_seed(0))
    assert float(((f[:, 1] > 0) & (f[:, 2] > 0)).float().mean()) == pytest.approx(0.125, abs=0.01)
    with pytest.raises(ValueError, match="summing above 1"):
        ToyModel([Feature(0.5, [Feature(0.6), Feature(0.6)], exclusive=True)], d=5)


def perfect_sae(toy, absorb_parent=None):
    """An SAE whose latents are the true features (optionally with parent 0 absorbed)."""
    n, d = toy.n_features, toy.d
    sae = MatryoshkaBatchTopKSAE(d, n, 2, [n])
    enc = toy.unit_directions.T / toy.directions.norm(dim=1)[None, :]
    dec = toy.directions.clone()
    if absorb_parent is not None:
        parent, children = toy.parent_child_groups()[absorb_parent]
        # the parent latent switches off whenever a child is on; children carry the parent
        enc[:, parent] -= 2 * toy.unit_directions[children].sum(0) / toy.directions[parent].norm()
        for c in children:
            dec[c] += toy.directions[parent]
    with torch.no_grad():
        sae.W_enc.copy_(enc)
        sae.W_dec.copy_(dec)
        sae.threshold.fill_(0.5)
    return sae


def test_metrics_on_hand_built_saes():
    toy = ToyModel.post_tree(magnitude_noise=0.0)
    good = evaluate_sae(perfect_sae(toy), toy, n_samples=20_000)
    assert good.absorption == 0 and good.recovery == pytest.approx(1.0, abs=1e-5)
    assert good.fvu == pytest.approx(0.0, abs=1e-6)
    assert good.l0 == pytest.approx(toy.expected_l0(), abs=0.03)
    bad = evaluate_sae(perfect_sae(toy, absorb_parent=1), toy, n_samples=20_000)
    assert bad.absorption_per_parent == [0.0, 1.0, 0.0]
    assert bad.absorption == pytest.approx(1 / 3)
    assert bad.recovery < 0.99


def test_demo_command_writes_table_and_figures(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "300"]) == 0
    out = capsys.readouterr().out
    assert "| vanilla |" in out and "| matryoshka |" in out
    for name in ("activations.png", "decoder_cosine.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"vanilla", "matryoshka"}
    assert (tmp_path / "runs" / "trainer_1" / "ae.pt").is_file()
