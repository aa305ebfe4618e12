"""SAE modules: upstream compatibility, 2-D/3-D input, folded weights, loading errors."""

import pytest
import torch
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE as UpstreamSAE

from matryoshka_plugin import CheckpointError, MatryoshkaBatchTopKSAE, MatryoshkaLogSparsitySAE


def trained_like(sae, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return sae


def test_state_dict_is_upstream_layout_and_outputs_match():
    ours = trained_like(MatryoshkaBatchTopKSAE(16, 40, 4, [5, 15, 20]))
    ours.threshold.fill_(0.4)
    up = UpstreamSAE(16, 40, 4, [5, 15, 20])
    assert {k: v.shape for k, v in up.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    up.load_state_dict(ours.state_dict())
    x = torch.randn(32, 16)
    torch.testing.assert_close(ours.encode(x), up.encode(x))
    torch.testing.assert_close(ours(x), up(x))
    torch.testing.assert_close(
        ours.encode(x, use_threshold=False), up.encode(x, use_threshold=False)
    )
    # upstream -> ours
    back = MatryoshkaBatchTopKSAE(16, 40, 4, [5, 15, 20])
    back.load_state_dict(up.state_dict())
    torch.testing.assert_close(back(x), up(x))


def test_no_dense_encoding_before_threshold_exists():
    sae = trained_like(MatryoshkaBatchTopKSAE(16, 64, 3, [64]))
    assert float(sae.threshold) < 0
    x = torch.randn(50, 16)
    f = sae.encode(x)
    assert int((f != 0).sum()) <= 3 * 50
    up = UpstreamSAE(16, 64, 3, [64])
    up.load_state_dict(sae.state_dict())
    assert int((up.encode(x) != 0).sum()) > 3 * 50  # the upstream defect this avoids


def test_3d_input_matches_flattened():
    sae = trained_like(MatryoshkaBatchTopKSAE(8, 24, 2, [8, 16]))
    sae.threshold.fill_(0.2)
    x = torch.randn(3, 5, 8)
    f3 = sae.encode(x)
    assert f3.shape == (3, 5, 24)
    torch.testing.assert_close(f3.reshape(15, 24), sae.encode(x.reshape(15, 8)))
    assert sae(x).shape == x.shape
    ls = trained_like(MatryoshkaLogSparsitySAE(8, 24))
    torch.testing.assert_close(ls.encode(x).reshape(15, 24), ls.encode(x.reshape(15, 8)))
    assert ls(x).shape == x.shape
    with pytest.raises(ValueError, match="last dimension 8"):
        sae.encode(torch.randn(4, 9))


def test_active_groups_give_nested_smaller_sae():
    sae = trained_like(MatryoshkaBatchTopKSAE(8, 24, 4, [4, 8, 12]))
    sae.threshold.fill_(0.0)
    x = torch.randn(10, 8)
    full = sae.encode(x)
    sae.active_groups = 2
    small = sae.encode(x)
    assert torch.all(small[:, 12:] == 0)
    torch.testing.assert_close(small[:, :12], full[:, :12])
    assert sae.widths == [4, 12, 24]


def test_log_sparsity_public_encoding_folds_scale_and_norms():
    sae = trained_like(MatryoshkaLogSparsitySAE(8, 12))
    sae.input_norm.fill_(5.0)
    x = torch.randn(20, 8) * 3
    c = 5.0 / 8**0.5
    a = torch.relu((x / c) @ sae.W_enc + sae.b_enc)
    raw_recon = (a @ sae.W_dec + sae.b_dec) * c
    torch.testing.assert_close(sae(x), raw_recon, rtol=1e-5, atol=1e-5)
    f = sae.encode(x)
    torch.testing.assert_close(f, a * sae.W_dec.norm(dim=1) * c, rtol=1e-5, atol=1e-6)
    w = sae.folded_weights()
    plain = torch.relu(x @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(plain, f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain @ w["W_dec"] + w["b_dec"], raw_recon, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w["W_dec"].norm(dim=1), torch.ones(12))


def test_scale_biases_makes_the_sae_work_on_scaled_input():
    s = 7.0
    for sae in (trained_like(MatryoshkaBatchTopKSAE(8, 24, 3, [24])), trained_like(MatryoshkaLogSparsitySAE(8, 24))):
        if isinstance(sae, MatryoshkaBatchTopKSAE):
            sae.threshold.fill_(0.1)
        else:
            sae.input_norm.fill_(2.0)
        x = torch.randn(16, 8)
        before = sae(x)
        sae.scale_biases(s)
        torch.testing.assert_close(sae(s * x), s * before, rtol=1e-4, atol=1e-4)


def test_from_pretrained_round_trip_and_errors(tmp_path):
    sae = trained_like(MatryoshkaBatchTopKSAE(8, 24, 3, [8, 16]))
    torch.save(sae.state_dict(), tmp_path / "ae.pt")
    x = torch.randn(5, 8)
    torch.testing.assert_close(MatryoshkaBatchTopKSAE.from_pretrained(tmp_path)(x), sae(x))
    torch.testing.assert_close(MatryoshkaBatchTopKSAE.from_pretrained(tmp_path / "ae.pt")(x), sae(x))
    with pytest.raises(CheckpointError, match="k=5"):
        MatryoshkaBatchTopKSAE.from_pretrained(tmp_path, k=5)
    with pytest.raises(CheckpointError, match="missing weights file"):
        MatryoshkaBatchTopKSAE.from_pretrained(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes((tmp_path / "ae.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        MatryoshkaBatchTopKSAE.from_pretrained(tmp_path / "bad.pt")
    torch.save({"W_enc": torch.zeros(8, 24)}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="lacks"):
        MatryoshkaBatchTopKSAE.from_pretrained(tmp_path / "partial.pt")
    ls = trained_like(MatryoshkaLogSparsitySAE(8, 24))
    torch.save(ls.state_dict(), tmp_path / "ls.pt")
    torch.testing.assert_close(MatryoshkaLogSparsitySAE.from_pretrained(tmp_path / "ls.pt")(x), ls(x))
    with pytest.raises(CheckpointError):
        MatryoshkaLogSparsitySAE.from_pretrained(tmp_path / "ae.pt")


@pytest.mark.parametrize("k", [0, -1, 25, 2.5])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k must be"):
        MatryoshkaBatchTopKSAE(8, 24, k, [24])


def test_bad_group_sizes():
    with pytest.raises(ValueError, match="sum to"):
        MatryoshkaBatchTopKSAE(8, 24, 2, [8, 8])
    with pytest.raises(ValueError, match="at least one latent"):
        MatryoshkaBatchTopKSAE(8, 24, 2, [24, 0])
