"""Comparing trained SAEs on an activation stream: mean max correlation, prefix FVU, co-firing edges.

Every function takes SAEs as any objects with ``encode(x) -> latents`` (``[tokens, n]``; the
co-firing edges and the tree view also read the decoder, through
:func:`~matryoshka_plugin.registry.decoder_rows`: ``W_dec [n, d]`` as this package's SAEs and
dictionary_learning's Matryoshka SAE hold it, a ``decoder`` ``nn.Linear`` as its ``AutoEncoder``
and ``BatchTopKSAE`` do, or what a registered class's accessor reads) and activations as a
``[tokens, d]`` tensor (cut into ``batch_size`` rows) or any iterable of ``[tokens, d]`` batches.
Statistics are summed over the stream in float64, so a stream in batches gives the result of
the whole tensor at once (up to float64 rounding) for SAEs that encode each token on its own. An
SAE whose ``encode`` depends on the batch (batch top-k before it has an inference threshold)
gives codes, and so results, that depend on how the stream is cut (docs/analysis.md).

* :func:`mean_max_correlation`: the original Matryoshka post's measure of how well a large SAE
  keeps a smaller reference SAE's latents: for each reference latent, the highest Pearson
  correlation (over tokens) of its activation with any latent of the other SAE; their mean.
* :func:`prefix_fvu`: fraction of variance unexplained when only the first ``m`` latents of one
  SAE are decoded, for every nested group boundary or given ``m``.
* :func:`cofiring_edges`: parent -> child edges between two SAEs (or two nested prefixes of one):
  ``P(parent fires | child fires)`` and the cosine of their decoder directions.

A latent "fires" on a token when its activation is non-zero.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import torch

from .registry import decoder_rows

__all__ = [
    "MeanMaxCorrelation",
    "PrefixFVU",
    "CofiringEdges",
    "mean_max_correlation",
    "prefix_fvu",
    "cofiring_edges",
    "nested_widths",
    "checked_encode",
    "cross_products",
    "decoder_cosines",
]

# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


class MeanMaxCorrelation(NamedTuple):
    """Result of :func:`mean_max_correlation`."""

    mean: float
    """Mean of ``max_corr`` over the reference latents that have a defined correlation (nan if none)."""
    max_corr: torch.Tensor
    """``[n_reference]`` float64: each reference latent's highest correlation with a latent of
    ``other``; nan for a reference latent that never fires (or is constant) on the stream."""
    argmax: torch.Tensor
    """``[n_reference]`` int64: the index of that best-matching latent of ``other``; -1 where
    ``max_corr`` is nan."""
    n_dead_reference: int
    """Reference latents left out of the mean: they never fire (or are constant) on the stream."""
    n_dead_other: int
    """Latents of ``other`` that never fire (or are constant): no reference latent is matched to them."""
    n_tokens: int
    """Tokens in the stream."""


class PrefixFVU(NamedTuple):
    """Result of :func:`prefix_fvu`."""

    widths: list[int]
    """The prefix widths ``m`` measured (ascending)."""
    fvu: torch.Tensor
    """``[len(widths)]`` float64: ``sum ||x - decode(f[:, :m])||^2 / sum ||x - mean(x)||^2``."""
    l0: torch.Tensor
    """``[len(widths)]`` float64: mean number of the first ``m`` latents firing per token."""
    n_tokens: int
    """Tokens in the stream."""


class CofiringEdges(NamedTuple):
    """Result of :func:`cofiring_edges`: ``len(child)`` edges, best first within each child."""

    child: torch.Tensor
    """``[E]`` int64: child latent index (in the child SAE)."""
    parent: torch.Tensor
    """``[E]`` int64: parent latent index (in the parent SAE)."""
    p_parent_given_child: torch.Tensor
    """``[E]`` float64: share of the tokens on which the child fires where the parent fires too."""
    decoder_cosine: torch.Tensor
    """``[E]`` float64: cosine similarity of the two latents' decoder directions."""
    child_fires: torch.Tensor
    """``[n_child]`` int64: tokens on which each child latent fires (0: no edges for it)."""
    parent_fires: torch.Tensor
    """``[n_parent]`` int64: tokens on which each parent latent fires."""
    n_tokens: int
    """Tokens in the stream."""


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _is_one_shot(activations: Any) -> bool:
    """Whether ``activations`` is an iterator that a second pass would find empty."""
    return not isinstance(activations, torch.Tensor) and iter(activations) is activations


def _batches(activations: Any, batch_size: int, device: torch.device | str | None) -> Iterator[torch.Tensor]:
    """``[tokens, d]`` float32 batches of a tensor (``batch_size`` rows each) or of an iterable."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(activations, torch.Tensor):
        if activations.ndim != 2:
            raise ValueError(f"activations must be [tokens, d], got shape {tuple(activations.shape)}")
        source: Iterable[torch.Tensor] = activations.split(batch_size)
    else:
        source = activations
    for i, x in enumerate(source):
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            raise ValueError(f"batch {i} of the activations is not a [tokens, d] tensor: "
                             f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
        if x.shape[0]:
            yield x.to(device=device, dtype=torch.float32) if device is not None else x.float()


def checked_encode(sae: Any, x: torch.Tensor, what: str) -> torch.Tensor:
    """``sae.encode(x)``, refused (naming ``what``) unless it is a ``[tokens, latents]`` tensor."""
    f = sae.encode(x)
    if not isinstance(f, torch.Tensor) or f.ndim != 2 or f.shape[0] != x.shape[0]:
        raise ValueError(f"{what}.encode returned {type(f).__name__} {tuple(getattr(f, 'shape', ()))} "
                         f"for a batch of {x.shape[0]} tokens; expected [tokens, latents]")
    return f


def _sae_device(sae: Any) -> torch.device | None:
    try:
        return next(sae.parameters()).device
    except (AttributeError, StopIteration):
        return None


def cross_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a.T @ b`` in float64. SAE latents are sparse: a sparse ``a`` costs ``nnz(a) * b.shape[1]``
    multiply-adds instead of ``tokens * a.shape[1] * b.shape[1]``."""
    a64, b64 = a.double(), b.double()
    if a.is_cuda or a.numel() == 0 or (a != 0).sum() > 0.2 * a.numel():
        return a64.T @ b64
    return torch.sparse.mm(a64.T.to_sparse(), b64)


def decoder_cosines(child_rows: torch.Tensor, parent_rows: torch.Tensor) -> torch.Tensor:
    """``[n_child, n_parent]`` float64 (on the CPU) cosine similarities of two sets of decoder
    rows (``registry.decoder_rows``)."""
    child = torch.nn.functional.normalize(child_rows.double().cpu(), dim=1)
    return child @ torch.nn.functional.normalize(parent_rows.double().cpu(), dim=1).T


def nested_widths(sae: Any) -> list[int]:
    """The nested prefix widths of a Matryoshka SAE: the cumulative ``group_sizes`` (this package's
    and dictionary_learning's ``MatryoshkaBatchTopKSAE``); ``[dict_size]`` for an SAE without groups."""
    sizes = getattr(sae, "group_sizes", None)
    if sizes is not None:
        return [int(w) for w in torch.as_tensor(sizes).cumsum(0).tolist()]
    n = getattr(sae, "dict_size", None)
    if n is None:
        raise TypeError(f"{type(sae).__name__} has neither group_sizes nor dict_size; pass the widths")
    return [int(n)]


# ----------------------------------------------------------------------------------------------
# Mean max correlation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def mean_max_correlation(
    reference: Any,
    other: Any,
    activations: torch.Tensor | Iterable[torch.Tensor],
    *,
    batch_size: int = 4096,
    chunk: int | None = 8192,
    device: torch.device | str | None = None,
) -> MeanMaxCorrelation:
    """For each latent of ``reference``, its highest Pearson correlation over the activation stream
    with any latent of ``other``, and the mean of those maxima (the original Matryoshka post's
    "mean max correlation"; a permuted copy of ``reference`` scores exactly 1).

    The stream is read once per chunk of ``chunk`` latents of ``other`` (once in all when
    ``chunk`` is ``None`` or at least ``other``'s width), summing per latent the activation and
    its square and, for the chunk, the reference x other cross products, all in float64.

    Cost: memory ``8 * n_ref * chunk`` bytes for the cross products (a 65k x 65k pair with the
    default chunk: 4.3 GB, 8 passes) plus both SAEs' ``[batch_size, n]`` encodings; time per pass:
    both encodings of every token plus ``nnz(reference latents) * chunk`` multiply-adds (latents
    are sparse; a dense reference costs ``tokens * n_ref * chunk``). More than one pass needs
    ``activations`` to be a tensor or a re-iterable collection (a list), not a one-shot iterator.

    A latent with zero variance on the stream (it never fires, or is constant) has no defined
    correlation: such reference latents get ``max_corr = nan``, ``argmax = -1`` and are left out of
    the mean; such latents of ``other`` are never chosen as a match. Both are counted in the result.
    """
    dev = torch.device(device) if device is not None else _sae_device(other)
    width = getattr(other, "dict_size", None)
    if chunk is not None and isinstance(width, int) and width > chunk and _is_one_shot(activations):
        raise ValueError(
            f"other has {width} latents and chunk={chunk}: several passes over the activations are needed, "
            "but they are a one-shot iterator; pass a tensor or a list of batches, or chunk=None"
        )
    n_other: int | None = None
    passes: list[tuple[int, int]] | None = None
    best = best_idx = None
    stats_ref = alive_other = None
    n_tokens = 0
    start = 0
    while passes is None or start < len(passes):
        if passes is not None and start > 0 and _is_one_shot(activations):
            raise ValueError(
                f"{len(passes)} passes over the activations are needed (other has {n_other} latents, chunk={chunk}) "
                "but they are a one-shot iterator; pass a tensor or a list of batches, or chunk=None"
            )
        lo, hi = passes[start] if passes is not None else (0, 0)
        cross = sum_r = sq_r = sum_o = sq_o = None
        count = 0
        for x in _batches(activations, batch_size, dev):
            a = checked_encode(reference, x, "reference")
            b_full = checked_encode(other, x, "other")
            if passes is None:
                n_other = b_full.shape[1]
                step = n_other if chunk is None else max(1, min(int(chunk), n_other))
                passes = [(i, min(i + step, n_other)) for i in range(0, n_other, step)]
                lo, hi = passes[0]
            b = b_full[:, lo:hi]
            if cross is None:
                cross = torch.zeros(a.shape[1], hi - lo, dtype=torch.float64, device=a.device)
                sum_r = torch.zeros(a.shape[1], dtype=torch.float64, device=a.device)
                sq_r = torch.zeros_like(sum_r)
                sum_o = torch.zeros(hi - lo, dtype=torch.float64, device=a.device)
                sq_o = torch.zeros_like(sum_o)
            a64 = a.double()
            b64 = b.to(a.device).double()
            cross += cross_products(a, b.to(a.device))
            sum_r += a64.sum(0)
            sq_r += (a64 * a64).sum(0)
            sum_o += b64.sum(0)
            sq_o += (b64 * b64).sum(0)
            count += x.shape[0]
        if cross is None:
            raise ValueError("the activations hold no tokens")
        if passes is not None and start > 0 and count != n_tokens:
            raise ValueError(f"the activations changed between passes ({n_tokens} then {count} tokens)")
        n_tokens = count
        # Statistics of the reference are the same on every pass; keep the first.
        if stats_ref is None:
            stats_ref = _moments(sum_r, sq_r, n_tokens)
            best = torch.full((cross.shape[0],), -math.inf, dtype=torch.float64, device=cross.device)
            best_idx = torch.full((cross.shape[0],), -1, dtype=torch.long, device=cross.device)
            alive_other = torch.zeros(n_other, dtype=torch.bool)
        mean_r, std_r = stats_ref
        mean_o, std_o = _moments(sum_o, sq_o, n_tokens)
        alive_other[lo:hi] = (std_o > 0).cpu()
        cov = cross / n_tokens - mean_r[:, None] * mean_o[None, :]
        corr = (cov / (std_r[:, None] * std_o[None, :])).clamp(-1.0, 1.0)
        corr = torch.where((std_o > 0)[None, :], corr, torch.full_like(corr, -math.inf))
        chunk_best, chunk_idx = corr.max(1)
        better = chunk_best > best
        best = torch.where(better, chunk_best, best)
        best_idx = torch.where(better, chunk_idx + lo, best_idx)
        start += 1
    mean_r, std_r = stats_ref
    undefined = ~(std_r > 0) | torch.isinf(best)
    best = torch.where(undefined, torch.full_like(best, math.nan), best).cpu()
    best_idx = torch.where(undefined, torch.full_like(best_idx, -1), best_idx).cpu()
    valid = ~torch.isnan(best)
    mean = float(best[valid].mean()) if valid.any() else math.nan
    return MeanMaxCorrelation(mean, best, best_idx, int((~(std_r > 0)).sum()), int((~alive_other).sum()), n_tokens)


def _moments(total: torch.Tensor, squares: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation from sums; a variance within float64 rounding of zero counts as 0."""
    mean = total / n
    var = squares / n - mean * mean
    var = torch.where(var > 1e-12 * squares / n, var, torch.zeros_like(var))
    return mean, var.sqrt()


# ----------------------------------------------------------------------------------------------
# Nested-prefix FVU
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def prefix_fvu(
    sae: Any,
    activations: torch.Tensor | Iterable[torch.Tensor],
    widths: Sequence[int] | None = None,
    *,
    batch_size: int = 4096,
    device: torch.device | str | None = None,
) -> PrefixFVU:
    """Fraction of variance unexplained when only the first ``m`` latents are decoded, per ``m``.

    ``widths`` defaults to the SAE's nested group boundaries (:func:`nested_widths`). The latents
    are encoded once per batch with the whole SAE (a BatchTopK threshold applies as usual) and
    ``sae.decode`` sees them with every latent from ``m`` on set to zero. Cost: one encoding and
    ``len(widths)`` decodings per token; memory: one ``[batch_size, n]`` encoding.
    """
    ws = sorted({int(w) for w in (nested_widths(sae) if widths is None else widths)})
    dev = torch.device(device) if device is not None else _sae_device(sae)
    sse = torch.zeros(len(ws), dtype=torch.float64)
    active = torch.zeros(len(ws), dtype=torch.float64)
    x_sum = x_sq = None
    n = 0
    for x in _batches(activations, batch_size, dev):
        f = checked_encode(sae, x, "sae")
        if x_sum is None:
            bad = [w for w in ws if not 0 <= w <= f.shape[1]]
            if bad:
                raise ValueError(f"prefix widths {bad} lie outside [0, {f.shape[1]}] (the SAE's latents)")
            x_sum = torch.zeros(x.shape[1], dtype=torch.float64)
            x_sq = torch.zeros(x.shape[1], dtype=torch.float64)
        counts = (f != 0).sum(0).double().cpu().cumsum(0)
        cum_active = torch.cat([counts.new_zeros(1), counts])
        for i, w in enumerate(ws):
            g = f.clone()
            g[:, w:] = 0
            sse[i] += float((x.double() - sae.decode(g).double()).pow(2).sum())
            active[i] += float(cum_active[w])
        x64 = x.double().cpu()
        x_sum += x64.sum(0)
        x_sq += (x64 * x64).sum(0)
        n += x.shape[0]
    if x_sum is None:
        raise ValueError("the activations hold no tokens")
    total_var = float((x_sq - x_sum * x_sum / n).sum())
    if not total_var > 0:
        raise ValueError("the activations have zero variance; FVU is undefined")
    return PrefixFVU(ws, sse / total_var, active / n, n)


# ----------------------------------------------------------------------------------------------
# Co-firing parent -> child edges
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def cofiring_counts(
    parent: Any,
    child: Any,
    activations: torch.Tensor | Iterable[torch.Tensor],
    *,
    batch_size: int = 4096,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(both [n_child, n_parent], child_fires [n_child], parent_fires [n_parent], tokens)``:
    tokens on which both, each child latent and each parent latent fire (float64 sums of 0/1)."""
    dev = torch.device(device) if device is not None else _sae_device(child)
    both = c_fires = p_fires = None
    n = 0
    for x in _batches(activations, batch_size, dev):
        c = (checked_encode(child, x, "child") != 0).to(torch.float32)
        p = (checked_encode(parent, x, "parent") != 0).to(torch.float32).to(c.device)
        if both is None:
            both = torch.zeros(c.shape[1], p.shape[1], dtype=torch.float64, device=c.device)
            c_fires = torch.zeros(c.shape[1], dtype=torch.float64, device=c.device)
            p_fires = torch.zeros(p.shape[1], dtype=torch.float64, device=c.device)
        both += cross_products(c, p)
        c_fires += c.sum(0).double()
        p_fires += p.sum(0).double()
        n += x.shape[0]
    if both is None:
        raise ValueError("the activations hold no tokens")
    return both.cpu(), c_fires.cpu(), p_fires.cpu(), n


def _edges_from_counts(
    both: torch.Tensor, c_fires: torch.Tensor, p_fires: torch.Tensor, n: int,
    dec_child: torch.Tensor, dec_parent: torch.Tensor, top: int, min_p: float,
) -> CofiringEdges:
    cos = decoder_cosines(dec_child, dec_parent)
    p = both / c_fires.clamp_min(1)[:, None]
    k = max(0, min(int(top), p.shape[1]))
    # Best parents first: highest P(parent | child), ties broken by the decoder cosine.
    order_cos = cos.argsort(dim=1, descending=True, stable=True)
    order = order_cos.gather(1, p.gather(1, order_cos).argsort(dim=1, descending=True, stable=True))[:, :k]
    child_idx = torch.arange(p.shape[0])[:, None].expand(-1, k)
    pk = p.gather(1, order)
    keep = (c_fires[:, None] > 0) & (pk >= min_p) & (pk > 0)
    return CofiringEdges(
        child_idx[keep], order[keep], pk[keep], cos.gather(1, order)[keep],
        c_fires.long(), p_fires.long(), n,
    )


def cofiring_edges(
    parent: Any,
    child: Any,
    activations: torch.Tensor | Iterable[torch.Tensor],
    *,
    top: int = 3,
    min_p: float = 0.0,
    batch_size: int = 4096,
    device: torch.device | str | None = None,
) -> CofiringEdges:
    """Parent -> child edges between two SAEs (typically a smaller ``parent`` and a larger ``child``).

    For every child latent that fires on the stream, its ``top`` parent latents by
    ``P(parent fires | child fires)`` (ties by decoder cosine), keeping those with a probability
    of at least ``min_p`` and above zero. Cost: one pass; memory ``8 * n_child * n_parent`` bytes.
    """
    both, c_fires, p_fires, n = cofiring_counts(parent, child, activations, batch_size=batch_size, device=device)
    return _edges_from_counts(both, c_fires, p_fires, n, decoder_rows(child), decoder_rows(parent),
                              top, min_p)
