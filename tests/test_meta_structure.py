"""decoder_meta_structure against decoders whose meta-structure is known by construction."""

from __future__ import annotations

import pytest
import torch

from matryoshka_plugin.saebench import SAEBenchError, decoder_meta_structure

D, N_ATOMS, N_ROWS = 32, 12, 256
META = dict(autocast=False, train_steps=300, train_batch_size=256, k=2, learning_rate=5e-3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _atoms(gen: torch.Generator) -> torch.Tensor:
    """``N_ATOMS`` orthonormal meta-directions in ``D`` dimensions."""
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen))
    return q[:, :N_ATOMS].T


def _in_span_fve(rows: torch.Tensor, atoms: torch.Tensor) -> float:
    """The variance explained (SAEBench's definition: 1 - residual / variance about the mean) by
    the best reconstruction from the known meta-directions, found by projection: what a meta-SAE
    that had learned exactly those directions would score."""
    rows = torch.nn.functional.normalize(rows, dim=1)
    residual = rows - rows @ atoms.T @ atoms
    return 1 - float((residual**2).sum()) / float(((rows - rows.mean(0)) ** 2).sum())


@pytest.mark.parametrize("data_seed", [0, 1])
def test_structured_decoder_scores_its_brute_force_value_and_random_scores_clearly_less(data_seed):
    gen = torch.Generator().manual_seed(data_seed)
    atoms = _atoms(gen)
    # Each row is the normalised sum of 2 of the 12 directions: a k=2 meta-SAE can rebuild every
    # row exactly once it has learned the 12 directions.
    pairs = torch.stack([torch.randperm(N_ATOMS, generator=gen)[:2] for _ in range(N_ROWS)])
    structured = torch.nn.functional.normalize(atoms[pairs].sum(1), dim=1)
    random_rows = torch.randn(N_ROWS, D, generator=gen)  # same shape, no shared directions

    reference = _in_span_fve(structured, atoms)
    assert reference == pytest.approx(1.0, abs=1e-5)  # exactly in the span of the directions
    got = decoder_meta_structure(structured, seeds=[0], **META)
    rnd = decoder_meta_structure(random_rows, seeds=[0], **META)
    assert got["n"] == 1 and got["per_seed"] == [got["variance_explained"]]
    assert abs(got["variance_explained"] - reference) < 0.03, got
    assert rnd["variance_explained"] < got["variance_explained"] - 0.25, (got, rnd)


def test_rows_are_scored_as_directions():
    """The rows are scaled to unit norm first: rescaling them leaves the score unchanged, and
    mixing the structured rows with random ones lowers it."""
    gen = torch.Generator().manual_seed(2)
    atoms = _atoms(gen)
    pairs = torch.stack([torch.randperm(N_ATOMS, generator=gen)[:2] for _ in range(N_ROWS)])
    structured = torch.nn.functional.normalize(atoms[pairs].sum(1), dim=1)
    scale = torch.rand(N_ROWS, 1, generator=gen) * 5 + 0.1
    a = decoder_meta_structure(structured, seeds=[3], **META)["variance_explained"]
    b = decoder_meta_structure(structured * scale, seeds=[3], **META)["variance_explained"]
    assert a == pytest.approx(b, abs=1e-6)
    half = structured.clone()
    half[::2] = torch.randn(N_ROWS // 2, D, generator=gen)
    c = decoder_meta_structure(half, seeds=[3], **META)["variance_explained"]
    assert c < a - 0.1, (a, c)


def test_bad_input_is_named():
    with pytest.raises(SAEBenchError, match="expected decoder rows"):
        decoder_meta_structure(torch.zeros(3, 4, 5))
    with pytest.raises(SAEBenchError, match="unknown meta_structure config fields"):
        decoder_meta_structure(torch.randn(8, 4), steps=3)
