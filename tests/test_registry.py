"""The architecture registry: one registration makes a new SAE class load, export and get labelled.

``TiedReLUSAE`` below is a class the package has never heard of. Registering one ``Architecture``
for it is all it takes for ``load_dictionary`` to read its folders, ``export_to_saelens`` to write
a folder stock SAELens loads with the same latents and reconstructions, and SAEBench records to
carry its label.
"""

from __future__ import annotations

import json

import pytest
import torch
from dictionary_learning.dictionary import AutoEncoder, AutoEncoderNew, GatedAutoEncoder, JumpReluAutoEncoder
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE as UpstreamMatryoshkaSAE
from dictionary_learning.trainers.top_k import AutoEncoderTopK
from sae_lens import SAE

from matryoshka_plugin import (
    CheckpointError,
    MatryoshkaBatchTopKSAE,
    MatryoshkaLogSparsitySAE,
    export_to_saelens,
    load_dictionary,
)
from matryoshka_plugin.analysis import cofiring_edges
from matryoshka_plugin.io import check_keys, read_state_dict
from matryoshka_plugin.registry import (
    PACKAGE_MARK,
    Architecture,
    architecture_for,
    architecture_of,
    architectures,
    decoder_rows,
    register_architecture,
    unit_decoder_rows,
    unregister_architecture,
)
from matryoshka_plugin.saebench.references import training_architecture
from matryoshka_plugin.saelens.convert import SAELensWeights
from matryoshka_plugin.toy import DecoderView
from matryoshka_plugin.tree_view import Level, build_tree

D, N = 8, 16


class TiedReLUSAE(torch.nn.Module):
    """A ReLU SAE whose decoder is its encoder transposed."""

    def __init__(self, activation_dim: int, dict_size: int):
        super().__init__()
        self.activation_dim, self.dict_size = activation_dim, dict_size
        self.W = torch.nn.Parameter(torch.randn(activation_dim, dict_size) / activation_dim**0.5)
        self.b_enc = torch.nn.Parameter(0.1 * torch.randn(dict_size))
        self.b_dec = torch.nn.Parameter(0.1 * torch.randn(activation_dim))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W.T + self.b_dec


def load_tied(path, trainer_cfg, device):
    state = read_state_dict(path)
    check_keys(state, ["W", "b_enc", "b_dec"], path)
    sae = TiedReLUSAE(*state["W"].shape)
    sae.load_state_dict(state)
    return sae.to(device)


def tied_to_saelens(sae: TiedReLUSAE, trainer_cfg) -> SAELensWeights:
    W = sae.W.detach().float()
    weights = {"W_enc": W.clone(), "b_enc": sae.b_enc.detach().float().clone(), "W_dec": W.T.contiguous(),
               "b_dec": sae.b_dec.detach().float().clone()}
    return SAELensWeights("standard", "tied_relu", weights, apply_b_dec_to_input=True)


def tied_rows(sae: TiedReLUSAE) -> torch.Tensor:
    return sae.W.detach().T  # neither W_dec nor decoder.weight: only its registration can say this


TIED = Architecture("TiedReLUSAE", "tied_relu", load=load_tied, to_saelens=tied_to_saelens, decoder=tied_rows)


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    sae = TiedReLUSAE(D, N)
    path = tmp_path / "trainer_0"
    path.mkdir()
    torch.save(sae.state_dict(), path / "ae.pt")
    trainer = {"dict_class": "TiedReLUSAE", "activation_dim": D, "dict_size": N, "layer": 0, "lm_name": "toy"}
    (path / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 16}}))
    return path, sae


@pytest.fixture
def registered():
    register_architecture(TIED)
    try:
        yield TIED
    finally:
        unregister_architecture("TiedReLUSAE")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_unregistered_class_is_unknown_everywhere(folder, tmp_path):
    path, _ = folder
    with pytest.raises(CheckpointError, match="unknown dict_class 'TiedReLUSAE'"):
        load_dictionary(path)
    with pytest.raises(CheckpointError, match="unknown dict_class 'TiedReLUSAE'"):
        export_to_saelens(path, tmp_path / "out", hook_name="blocks.0.hook_resid_post")
    assert training_architecture({"dict_class": "TiedReLUSAE"}) == "TiedReLUSAE"  # no label: the class name


def test_one_registration_loads_exports_and_labels(folder, registered, tmp_path):
    path, original = folder
    ae, config = load_dictionary(path)
    assert type(ae) is TiedReLUSAE and architecture_of(ae) is TIED
    assert training_architecture(config["trainer"]) == "tied_relu"

    out = export_to_saelens(path, tmp_path / "out", hook_name="blocks.0.hook_resid_post")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["metadata"]["training_architecture"] == "tied_relu"
    sae = SAE.load_from_disk(out)
    x = torch.randn(32, D)
    with torch.no_grad():
        f_ref = original.encode(x)
        f = sae.encode(x)
        assert (f_ref > 0).any()
        assert rel_err(f, f_ref) <= 1e-5
        assert rel_err(sae.decode(f), original.decode(f_ref)) <= 1e-5


def test_a_class_without_converter_is_refused_by_export(folder, tmp_path):
    path, _ = folder
    register_architecture(Architecture("TiedReLUSAE", "tied_relu", load=load_tied))
    try:
        load_dictionary(path)  # loading needs no converter
        with pytest.raises(CheckpointError, match=r"export does not support TiedReLUSAE .*supported: .*AutoEncoderTopK"):
            export_to_saelens(path, tmp_path / "out", hook_name="blocks.0.hook_resid_post")
    finally:
        unregister_architecture("TiedReLUSAE")
    assert not (tmp_path / "out").exists()


def test_matryoshka_batch_topk_is_ours_only_with_the_package_mark():
    ours = architecture_for({"dict_class": "MatryoshkaBatchTopKSAE", "package": PACKAGE_MARK})
    upstream = architecture_for({"dict_class": "MatryoshkaBatchTopKSAE"})
    assert (ours.upstream, upstream.upstream) == (False, True)
    assert ours.load is not None and upstream.load is None  # upstream folders load through dictionary_learning
    assert ours.label == upstream.label == "matryoshka_batchtopk"
    assert ours.to_saelens is not None and upstream.to_saelens is not None
    # a class only this package defines is ours without the mark too
    assert architecture_for({"dict_class": "MatryoshkaLogSparsitySAE"}).upstream is False
    assert architecture_for({"dict_class": "NoSuchSAE"}) is None
    assert architecture_of(MatryoshkaBatchTopKSAE(D, N, 2, [4, 12])) is ours
    assert architecture_of(UpstreamMatryoshkaSAE(D, N, 2, [4, 12])) is upstream


def test_a_taken_name_is_not_replaced():
    register_architecture(TIED)
    try:
        register_architecture(TIED)  # the same entry again is harmless
        with pytest.raises(ValueError, match="already registered"):
            register_architecture(Architecture("TiedReLUSAE", "other_label", load=load_tied))
        assert architecture_for({"dict_class": "TiedReLUSAE"}) is TIED
    finally:
        unregister_architecture("TiedReLUSAE")


# Every built-in registration, built small. Log-sparsity: decode runs along the unit directions of
# its free-norm rows, so its decode reference gives directions, not the stored rows.
BUILD = {
    (False, "MatryoshkaBatchTopKSAE"): (lambda: MatryoshkaBatchTopKSAE(D, N, 2, [4, 12]), True),
    (False, "MatryoshkaLogSparsitySAE"): (lambda: MatryoshkaLogSparsitySAE(D, N), False),
    (True, "MatryoshkaBatchTopKSAE"): (lambda: UpstreamMatryoshkaSAE(D, N, 2, [4, 12]), True),
    (True, "BatchTopKSAE"): (lambda: BatchTopKSAE(D, N, 2), True),
    (True, "AutoEncoderTopK"): (lambda: AutoEncoderTopK(D, N, 2), True),
    (True, "AutoEncoder"): (lambda: AutoEncoder(D, N), True),
    (True, "AutoEncoderNew"): (lambda: AutoEncoderNew(D, N), True),
    (True, "GatedAutoEncoder"): (lambda: GatedAutoEncoder(D, N), True),
    (True, "JumpReluAutoEncoder"): (lambda: JumpReluAutoEncoder(D, N), True),
}


def decode_reference(sae: torch.nn.Module) -> torch.Tensor:
    """What the class's own decode makes of each one-hot code, less what it makes of zero (the bias)."""
    with torch.no_grad():
        return sae.decode(torch.eye(N)) - sae.decode(torch.zeros(1, N))


@pytest.mark.parametrize("key", sorted(a.key for a in architectures()))
def test_decoder_rows_of_every_registered_class(key):
    assert key in BUILD, f"{key} is registered: add a builder for it to BUILD"
    build, decodes_rows = BUILD[key]
    torch.manual_seed(0)
    sae = build()
    assert architecture_of(sae).key == key
    with torch.no_grad():  # every weight and bias random, decoder norms far from 1
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
        if isinstance(sae, MatryoshkaLogSparsitySAE):
            sae.input_norm.fill_(5.0)  # a non-trivial input scale on b_dec
    ref = decode_reference(sae)
    rows = decoder_rows(sae)
    assert rows.shape == (N, D) and not rows.requires_grad
    if decodes_rows:
        torch.testing.assert_close(rows, ref, rtol=1e-5, atol=1e-5)
    else:  # stored as trained (free norms), decoded along the unit directions
        norms = rows.norm(dim=1)
        assert (norms - 1).abs().min() > 0.1
        torch.testing.assert_close(rows / norms[:, None], ref, rtol=1e-5, atol=1e-5)
    units = unit_decoder_rows(sae)
    assert units.dtype == torch.float32
    torch.testing.assert_close(units, torch.nn.functional.normalize(ref, dim=1), rtol=1e-5, atol=1e-5)


def test_a_class_without_rows_is_refused_by_name():
    with pytest.raises(TypeError, match="Identity has neither W_dec nor decoder.weight"):
        decoder_rows(torch.nn.Identity())


def test_one_registration_gives_every_decoder_reader_the_rows(registered):
    """A class whose rows only its registration can find: the accessor, the co-firing edges, the
    tree view and the toy metrics all read them through it."""
    torch.manual_seed(1)
    sae = TiedReLUSAE(D, N)
    ref = decode_reference(sae)
    torch.testing.assert_close(decoder_rows(sae), ref, rtol=1e-5, atol=1e-5)
    cos_ref = torch.nn.functional.normalize(ref.double(), dim=1) @ torch.nn.functional.normalize(ref.double(), dim=1).T

    x = torch.randn(64, D)
    edges = cofiring_edges(sae, sae, x, top=2)
    assert len(edges.child) > 0
    torch.testing.assert_close(edges.decoder_cosine, cos_ref[edges.child, edges.parent])

    tree = build_tree([Level("first", sae, (0, 8)), Level("rest", sae, (8, N))], x, [str(i) for i in range(64)])
    kids = [c for root in tree["roots"] for c in root["children"]]
    assert kids
    for root in tree["roots"]:
        for c in root["children"]:
            assert c["edge"]["decoder_cosine"] == pytest.approx(float(cos_ref[c["latent"], root["latent"]]))

    torch.testing.assert_close(DecoderView(sae).W_dec, torch.nn.functional.normalize(ref, dim=1))
