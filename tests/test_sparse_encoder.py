"""Exact batch top-k selection and the encoder's sparse backward against dense autograd."""

import pytest
import torch

from matryoshka_plugin.kernels import numba_available
from matryoshka_plugin.sparse_encoder import batch_topk_select, encoder_entries

HAS_NUMBA = numba_available()
BACKENDS = ["torch"] + (["fused"] if HAS_NUMBA else [])


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
@pytest.mark.parametrize("shape,count", [((64, 32), 100), ((512, 4096), 512 * 16), ((512, 4096), 512 * 600)])
def test_selection_equals_full_topk(shape, count, backend, kernel_path):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(*shape, generator=g).relu()
    got = batch_topk_select(scores, count, backend)
    want = torch.sort(torch.topk(scores.flatten(), count).indices).values
    assert torch.all(got[1:] > got[:-1])
    # compare the selected values (ties may pick different indices)
    torch.testing.assert_close(torch.sort(scores.flatten()[got]).values, torch.sort(scores.flatten()[want]).values)
    assert got.numel() == count


def test_selection_with_fewer_positive_values_than_count():
    scores = torch.zeros(1024, 1024)
    scores[3, 5] = 2.0
    scores[9, 1] = 1.0
    got = batch_topk_select(scores, 4096)
    assert got.numel() == 4096 and {3 * 1024 + 5, 9 * 1024 + 1} <= set(got.tolist())


@pytest.mark.parametrize("structure, falls_back", [("tied_plateau", True), ("few_rows", False)])
def test_selection_adversarial_structure_falls_back_exactly(structure, falls_back, monkeypatch):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2048, 512, generator=g) * 1e-3  # 2**20 entries: large enough to sample
    if structure == "tied_plateau":
        # 65536 equal values on top (rows 0, 16, ...): the sampled cut-off lands on them, nothing lies strictly above
        # it, and the full torch.topk has to run
        scores[::16] = 1.0
    else:
        # a few rows hold all the large values: the sample sees few of them, the cut-off is low
        scores[:4] += 10 + torch.rand(4, 512, generator=g)
    count = 1500
    sizes = []
    real_topk = torch.topk

    def recording_topk(t, k, *args, **kwargs):
        sizes.append(t.numel())
        return real_topk(t, k, *args, **kwargs)

    monkeypatch.setattr(torch, "topk", recording_topk)
    got = batch_topk_select(scores, count)
    monkeypatch.undo()
    assert (scores.numel() in sizes) is falls_back  # the full-size top-k ran only on the fallback
    want = torch.topk(scores.flatten(), count).values  # descending
    assert got.numel() == count and torch.all(got[1:] > got[:-1])
    assert torch.equal(torch.sort(scores.flatten()[got], descending=True).values, want)
    if structure == "few_rows":
        assert set((got // 512).unique().tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_sparse_backward_matches_dense_autograd(backend, dtype, layout, kernel_path):
    g = torch.Generator().manual_seed(0)
    B, d, n, k = 40, 12, 37, 4  # n not a multiple of the column kernel's 16-latent tile
    x = torch.randn(B, d, generator=g, dtype=dtype, requires_grad=True)
    W_enc = torch.randn(n, d, generator=g, dtype=dtype) / d**0.5
    # the SAE's [d, n] layout (the fused column kernel) and a transposed view (plain torch)
    W_enc = (W_enc.T.contiguous() if layout == "contiguous" else W_enc.T).requires_grad_()
    b_enc = torch.randn(n, generator=g, dtype=dtype, requires_grad=True)
    b_dec = torch.randn(d, generator=g, dtype=dtype, requires_grad=True)
    upstream = torch.randn(B * k, generator=g, dtype=dtype)  # arbitrary incoming gradient

    post = torch.relu((x - b_dec) @ W_enc + b_enc)
    flat = batch_topk_select(post.detach(), B * k)
    rows, cols = flat // n, flat % n
    dense_vals = post.reshape(-1)[flat]
    ref = torch.autograd.grad((dense_vals * upstream).sum(), [x, W_enc, b_enc, b_dec])

    vals = encoder_entries(x, W_enc, b_enc, b_dec, rows, cols, dense_vals.detach(), backend)
    torch.testing.assert_close(vals, dense_vals.detach())
    got = torch.autograd.grad((vals * upstream).sum(), [x, W_enc, b_enc, b_dec])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for name, a, b in zip(["x", "W_enc", "b_enc", "b_dec"], got, ref):
        torch.testing.assert_close(a, b, msg=name, **tol)
    assert got[1].shape == W_enc.shape and got[1].stride() == W_enc.stride()


def test_dense_pre_activations_in_bf16_keep_fp32_around_the_matmul():
    from matryoshka_plugin.sparse_encoder import dense_pre_activations, encoder_matmul_dtype

    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(64, 40, generator=g), torch.randn(40, 300, generator=g), torch.randn(300, generator=g)
    exact = torch.relu(x @ W + b)
    assert torch.equal(dense_pre_activations(x, W, b), torch.relu(torch.addmm(b, x, W)))
    low = dense_pre_activations(x, W, b, torch.bfloat16)
    assert low.dtype == torch.float32 and W.dtype == torch.float32
    # bf16-rounded operands, product rounded to bf16 once, bias added in fp32
    ref = torch.relu((x.bfloat16().float() @ W.bfloat16().float()).bfloat16().float() + b)
    torch.testing.assert_close(low, ref, rtol=1e-2, atol=2e-2)
    assert not torch.equal(low, exact)
    assert encoder_matmul_dtype(x) is None and encoder_matmul_dtype(x.bfloat16()) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert encoder_matmul_dtype(x) == torch.bfloat16
