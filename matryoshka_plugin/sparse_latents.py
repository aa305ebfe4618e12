"""Active latents of a batch in compressed-row form, and the sparse decode.

:class:`SparseLatents` is what the training encoders hand to the prefix loss
(``prefix_loss.prefix_mse``): the ``N`` active entries of a ``[B, n]`` latent matrix, sorted by
latent within each row, so that decoding costs O(N d) instead of a dense ``[B, n] @ [n, d]``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["SparseLatents", "sparse_from_flat", "sparse_from_dense", "sparse_decode"]


class SparseLatents(NamedTuple):
    """Active latents of a batch in compressed-row (CSR) form, sorted by latent within a row."""

    values: torch.Tensor
    """``[N]`` activations of the active entries. Carries the encoder's autograd graph."""
    indices: torch.Tensor
    """``[N]`` int64 latent index of each entry, ascending within each row."""
    offsets: torch.Tensor
    """``[B + 1]`` int64 row pointers: row ``b`` owns entries ``offsets[b]:offsets[b + 1]``."""
    n_latents: int
    """Dictionary size ``n``."""

    @property
    def batch_size(self) -> int:
        return self.offsets.numel() - 1

    def rows(self) -> torch.Tensor:
        """``[N]`` row of each entry."""
        counts = self.offsets[1:] - self.offsets[:-1]
        return torch.repeat_interleave(torch.arange(self.batch_size, device=counts.device), counts)

    def to_dense(self) -> torch.Tensor:
        """``[B, n]`` dense latents (differentiable in ``values``)."""
        dense = self.values.new_zeros(self.batch_size, self.n_latents)
        return dense.index_put((self.rows(), self.indices), self.values)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, K], [B, K])`` values and indices, ``K`` = the longest row. Padding slots hold
        value 0 and repeat the row's last index (0 for an empty row), keeping rows sorted."""
        counts = self.offsets[1:] - self.offsets[:-1]
        k_max = max(int(counts.max()) if counts.numel() else 0, 1)
        rows = self.rows()
        pos = torch.arange(rows.numel(), device=rows.device) - self.offsets[:-1][rows]
        idx = torch.zeros(self.batch_size, k_max, dtype=torch.long, device=rows.device)
        idx[rows, pos] = self.indices
        filled = torch.arange(k_max, device=rows.device)[None, :] < counts[:, None]
        last = idx.gather(1, (counts - 1).clamp_min(0)[:, None])
        idx = torch.where(filled, idx, last)
        vals = self.values.new_zeros(self.batch_size, k_max).index_put((rows, pos), self.values)
        return vals, idx


def _offsets_from_rows(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """``[batch + 1]`` row pointers of entries whose (ascending) rows are ``rows``."""
    counts = torch.bincount(rows, minlength=batch)
    offsets = torch.zeros(batch + 1, dtype=torch.long, device=rows.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets


def sparse_from_flat(
    flat_index: torch.Tensor, values: torch.Tensor, batch: int, n_latents: int, presorted: bool = False
) -> SparseLatents:
    """Build :class:`SparseLatents` from entries of a flattened ``[B, n]`` matrix.

    ``flat_index`` indexes ``row * n + latent``; ``values`` align with it. Pass
    ``presorted=True`` when ``flat_index`` is already ascending.
    """
    if not presorted:
        order = torch.argsort(flat_index)
        flat_index, values = flat_index[order], values[order]
    rows = torch.div(flat_index, n_latents, rounding_mode="floor")
    cols = flat_index - rows * n_latents
    return SparseLatents(values, cols, _offsets_from_rows(rows, batch), n_latents)


def sparse_from_dense(f: torch.Tensor) -> SparseLatents:
    """Non-zero entries of dense latents ``f [B, n]`` (gradients flow back into ``f``)."""
    batch, n = f.shape
    rows, cols = torch.nonzero(f.detach(), as_tuple=True)  # row-major, so already sorted
    return SparseLatents(f[rows, cols], cols, _offsets_from_rows(rows, batch), n)


def sparse_decode(latents: SparseLatents, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``x_hat = sum_entries value * W_dec[index] + b_dec`` without a dense ``[B, n]`` matmul."""
    out = torch.nn.functional.embedding_bag(
        latents.indices,
        W_dec,
        offsets=latents.offsets[:-1],
        per_sample_weights=latents.values.to(W_dec.dtype),
        mode="sum",
    )
    return out + b_dec
