"""The fused kernels' self-check: a kernel is trusted on a device only after it has matched the
torch reference there; a faulty one (wrong gradient, or one that raises as a failed compile
would) warns once and the torch path runs. Faulty kernels are injected through
``kernels.replace_kernel``, built from the torch reference so the fault is known exactly."""

import warnings

import pytest
import torch

from matryoshka_plugin import kernels
from matryoshka_plugin.kernels import KernelSelfCheckWarning, kernel_trusted, replace_kernel, self_check_error
from matryoshka_plugin.prefix_loss import _torch_prefix_mse, prefix_mse
from matryoshka_plugin.prefixes import PrefixWeights
from matryoshka_plugin.sparse_latents import sparse_from_flat


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient scaled by ``factor`` (a kernel's wrong decoder gradient)."""

    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def wrong_decoder_grad(x, latents, W_dec, b_dec, cum, chunk_elements, consume):
    """The torch reference with a decoder gradient 10% too large."""
    return _torch_prefix_mse(x, latents, _ScaleGrad.apply(W_dec, 1.1), b_dec, cum, chunk_elements)


def fails_to_compile(*args):
    raise RuntimeError("PTX assembly aborted (injected)")


def problem(seed=0, B=20, n=64, d=24, k=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    W = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    b = torch.randn(d, generator=g)
    pre = torch.rand(B, n, generator=g)
    flat = torch.topk(pre.flatten(), B * k).indices
    return x, W, b, pre.flatten()[flat], flat, B, n


def loss_and_grads(backend, seed=0):
    x, W, b, vals, flat, B, n = (t.clone().requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t
                                 for t in problem(seed))
    lat = sparse_from_flat(flat, vals, B, n)
    loss, resid = prefix_mse(x, lat, W, b, PrefixWeights.fixed_groups([8, 24, 32]), backend=backend)
    return [loss.detach(), resid, *torch.autograd.grad(loss, [x, vals, W, b])]


def assert_all_close(a, b):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("faulty", [wrong_decoder_grad, fails_to_compile], ids=["wrong-grad", "raises"])
def test_faulty_kernel_warns_once_and_torch_runs(faulty):
    reference = loss_and_grads("torch")
    with replace_kernel("cpu", faulty, name="injected"):
        if faulty is wrong_decoder_grad:  # the fault is real: forced, the kernel's W_dec gradient is off
            forced = loss_and_grads("fused")
            assert not torch.allclose(forced[4], reference[4], rtol=1e-3)
        with pytest.warns(KernelSelfCheckWarning) as caught:
            first = loss_and_grads("auto")
        assert len(caught) == 1
        message = str(caught[0].message)
        assert "injected" in message and "on cpu in torch.float32" in message
        if faulty is wrong_decoder_grad:
            assert "max relative error 0.1 on" in message  # gradient x 1.1: 10% of its largest entry
        else:
            assert "RuntimeError: PTX assembly aborted" in message
        assert_all_close(first, reference)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per device and dtype
            second = loss_and_grads("auto", seed=1)
        assert_all_close(second, loss_and_grads("torch", seed=1))
        assert kernel_trusted("cpu", torch.float32) is False
    # Leaving the block restores the real kernel and forgets the verdict.
    assert kernels.KERNELS["cpu"].name == "numba"
    assert ("cpu", torch.float32) not in kernels._CHECKS


def test_correct_kernel_is_checked_once_then_used():
    calls = []

    def counted(*args):
        calls.append(1)
        return _torch_prefix_mse(*args[:6])

    with replace_kernel("cpu", counted):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss_and_grads("auto")
            assert len(calls) == 2  # the self-check, then the real call
            loss_and_grads("auto")
            assert len(calls) == 3
        assert kernel_trusted("cpu", torch.float32)


def test_self_check_runs_under_inference_mode_and_autocast():
    """The first call may come from an evaluation (no autograd) or an autocast region: the check
    still computes gradients, in the dtype it was asked about."""
    with replace_kernel("cpu", wrong_decoder_grad, name="injected"):
        x, W, b, vals, flat, B, n = problem()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            with pytest.warns(KernelSelfCheckWarning, match="max relative error"):
                loss, _ = prefix_mse(x, sparse_from_flat(flat, vals, B, n), W, b, PrefixWeights.every_prefix(n))
        assert loss.dtype == torch.float32


@pytest.mark.skipif(not kernels.numba_available(), reason="numba is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numba_kernel_passes_its_self_check(dtype):
    err = self_check_error("cpu", dtype)
    assert err < (1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_above_matches_nonzero_and_gather(threads, dtype):
    """The cut-off kernel against ``nonzero(flat > cutoff)`` and a gather: sizes that do not
    split evenly into pieces, a cut-off nothing exceeds, ties at the cut-off (strictly above)."""
    numba_kernels = pytest.importorskip("matryoshka_plugin.kernels.numba")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        for n in (1, 7, 1000, 262_147):
            flat = torch.randn(n, generator=gen, dtype=dtype).relu_()
            flat[::5] = 0.5  # ties exactly at the cut-off stay out
            for cutoff in (0.5, 1.5, float(flat.max())):
                idx, vals = numba_kernels.above(flat, cutoff)
                ref = torch.nonzero(flat > cutoff).squeeze(1)
                assert torch.equal(idx, ref), (n, cutoff)
                assert torch.equal(vals, flat[ref]) and vals.dtype == dtype
    finally:
        torch.set_num_threads(before)
