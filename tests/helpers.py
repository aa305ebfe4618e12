"""Reference code and data the tests share (imported as ``helpers``: pytest puts tests/ on the path).

Plain functions only; fixtures live in conftest.py.
"""

from __future__ import annotations

import random

import torch

WORDS = (
    "the a cat dog bird fish sat ran flew swam on in under over mat tree house river "
    "big small red blue green quickly slowly and then because she he they ate saw liked"
).split()


def make_texts(n: int = 2000, seed: int = 0) -> list[str]:
    """Local text: short sentences over a small vocabulary (no downloads)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(n)]


def cycle(items):
    while True:
        yield from items


def low_rank_stream(d: int = 24, n_true: int = 96, batch: int = 256, density: float = 0.04, seed: int = 0):
    """Endless batches of sparse combinations of fixed random directions (learnable by an SAE).

    The directions are the same for every ``seed``; ``seed`` only changes the samples.
    """
    dirs = torch.randn(n_true, d, generator=torch.Generator().manual_seed(12345))
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    gen = torch.Generator().manual_seed(seed)
    while True:
        on = (torch.rand(batch, n_true, generator=gen) < density).float()
        mags = 0.5 + torch.rand(batch, n_true, generator=gen)
        yield (on * mags) @ dirs


def brute_force(x, f, W, b, weights):
    """sum_m lam[m] * mean_b ||x - (f[:, :m] @ W[:m] + b)||^2, one decode per prefix."""
    total = x.new_zeros(())
    for m in range(weights.n + 1):
        if weights.lam[m] == 0:
            continue
        x_hat = f[:, :m] @ W[:m] + b
        total = total + weights.lam[m] * (x - x_hat).pow(2).sum(-1).mean()
    return total


def linear_sae(enc_rows, dec_rows, threshold: float = 0.5):
    """A MatryoshkaBatchTopKSAE with the given encoder and decoder rows, zero biases and an
    inference threshold: constructed SAEs whose firing is known in advance."""
    from matryoshka_plugin import MatryoshkaBatchTopKSAE

    enc, dec = torch.tensor(enc_rows, dtype=torch.float32), torch.tensor(dec_rows, dtype=torch.float32)
    sae = MatryoshkaBatchTopKSAE(enc.shape[1], enc.shape[0], k=1, group_sizes=[enc.shape[0]])
    with torch.no_grad():
        sae.W_enc.copy_(enc.T)
        sae.W_dec.copy_(dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(threshold)
    return sae
