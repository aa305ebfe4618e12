"""The sparse prefix loss against a brute-force decode of every prefix (loss and gradients)."""

import subprocess
import sys

import pytest
import torch

from helpers import brute_force

from matryoshka_plugin.kernels import numba_available
from matryoshka_plugin.prefix_loss import prefix_mse
from matryoshka_plugin.prefixes import PrefixWeights
from matryoshka_plugin.sparse_latents import sparse_decode, sparse_from_dense, sparse_from_flat

HAS_NUMBA = numba_available()

BACKENDS = ["torch"] + (["fused"] if HAS_NUMBA else [])


def random_problem(B=7, n=17, d=6, density=0.35, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(B, n, generator=g) < density
    mask[0] = False  # a token with no active latent
    mask[1] = True  # a token with all latents active
    f = (torch.rand(B, n, generator=g, dtype=torch.float64) * mask).requires_grad_()
    W = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True)
    return x, f, W, b


N = 17
WEIGHTS = {
    "groups": PrefixWeights.fixed_groups([2, 5, 10]),
    "weighted_groups": PrefixWeights.fixed_groups([3, 3, 11], [0.2, 1.0, 3.0]),
    "balanced": PrefixWeights.fixed_groups([2, 5, 10]).balanced(0.75),
    "every": PrefixWeights.every_prefix(N),
    "pareto_expected": PrefixWeights.pareto_expected(N, 10),
    "pareto_sample": PrefixWeights.pareto_sample(N, 10, generator=torch.Generator().manual_seed(3)),
    "full_only": PrefixWeights.full_only(N),
    "with_empty_prefix": PrefixWeights(torch.linspace(1.0, 0.1, N + 1, dtype=torch.float64)),
}


@pytest.mark.parametrize("name", list(WEIGHTS))
@pytest.mark.parametrize("chunk", [1, 10_000])
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_and_gradients_match_brute_force(name, chunk, backend, kernel_path):
    weights = WEIGHTS[name]
    x, f, W, b = random_problem(n=N)
    ref = brute_force(x, f, W, b, weights)
    g_ref = torch.autograd.grad(ref, [x, f, W, b])
    out = prefix_mse(x, sparse_from_dense(f), W, b, weights, chunk_elements=chunk, backend=backend)
    g = torch.autograd.grad(out.loss, [x, f, W, b])
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    active = (f != 0).detach()
    torch.testing.assert_close(g[1] * active, g_ref[1] * active, rtol=1e-10, atol=1e-12)
    for got, want in zip([g[0], g[2], g[3]], [g_ref[0], g_ref[2], g_ref[3]]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.residual, (x - f @ W - b).detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    x, f, W, b = random_problem(B=3, n=6, d=3)
    lat = sparse_from_dense(f.detach())
    w = PrefixWeights.fixed_groups([1, 2, 3]).balanced(0.5)
    fn = lambda xx, vv, WW, bb: prefix_mse(xx, lat._replace(values=vv), WW, bb, w, backend=backend).loss  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, lat.values.clone().requires_grad_(), W, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_matches_float64(backend):
    x, f, W, b = random_problem(B=64, n=N, d=8)
    w = WEIGHTS["every"]
    ref = prefix_mse(x, sparse_from_dense(f), W, b, w, backend="torch").loss.detach()
    lat32 = sparse_from_dense(f.detach().float())
    got = prefix_mse(x.detach().float(), lat32, W.detach().float(), b.detach().float(), w, backend=backend).loss
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("name", ["groups", "every", "pareto_expected", "balanced", "pareto_sample"])
def test_fused_matches_torch_reference_in_float32(name, kernel_path):
    """The fused kernel against the plain implementation at a realistic sparsity, fp32."""
    g = torch.Generator().manual_seed(1)
    B, n, d, k = 96, 512, 64, 12
    x = torch.randn(B, d, generator=g, requires_grad=True)
    W = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    b = torch.randn(d, generator=g, requires_grad=True)
    pre = torch.randn(B, n, generator=g).relu()
    flat = torch.topk(pre.flatten(), B * k).indices
    weights = {
        "groups": PrefixWeights.fixed_groups([16, 48, 448]),
        "every": PrefixWeights.every_prefix(n),
        "pareto_expected": PrefixWeights.pareto_expected(n),
        "balanced": PrefixWeights.fixed_groups([16, 48, 448]).balanced(0.5),
        "pareto_sample": PrefixWeights.pareto_sample(n, generator=torch.Generator().manual_seed(0)),
    }[name]
    outs = []
    for backend, chunk in (("torch", 1 << 23), ("fused", 1 << 23), ("fused", 3 * d)):
        vals = pre.flatten()[flat].clone().requires_grad_()
        lat = sparse_from_flat(flat, vals, B, n)
        out = prefix_mse(x, lat, W, b, weights, chunk_elements=chunk, backend=backend)
        grads = torch.autograd.grad(out.loss * 3.0, [x, vals, W, b])
        outs.append((out.loss.detach(), out.residual, *grads))
    for other in outs[1:]:
        for got, want in zip(other, outs[0]):
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


def test_csr_layout_and_padding():
    B, n = 3, 8
    dense = torch.zeros(B, n)
    dense[0, [6, 1, 3]] = torch.tensor([1.0, 2.0, 3.0])
    dense[2, 7] = 5.0
    flat = torch.tensor([6, 23, 1, 3])  # unsorted; 23 = row 2, latent 7
    lat = sparse_from_flat(flat, dense.flatten()[flat], B, n)
    assert lat.offsets.tolist() == [0, 3, 3, 4]
    assert lat.indices.tolist() == [1, 3, 6, 7]
    assert lat.values.tolist() == [2.0, 3.0, 1.0, 5.0]
    assert lat.rows().tolist() == [0, 0, 0, 2]
    torch.testing.assert_close(lat.to_dense(), dense)
    vals, idx = lat.padded()
    assert idx.tolist() == [[1, 3, 6], [0, 0, 0], [7, 7, 7]]  # padding repeats the last index
    assert vals.tolist() == [[2.0, 3.0, 1.0], [0.0, 0.0, 0.0], [5.0, 0.0, 0.0]]
    same = sparse_from_dense(dense)
    for a, c in zip(same[:3], lat[:3]):
        assert torch.equal(a, c)


def test_sparse_decode_matches_dense():
    x, f, W, b = random_problem()
    torch.testing.assert_close(sparse_decode(sparse_from_dense(f), W, b), f @ W + b)


def test_shape_errors():
    x, f, W, b = random_problem(n=N)
    with pytest.raises(ValueError, match="unknown backend"):
        prefix_mse(x, sparse_from_dense(f), W, b, WEIGHTS["every"], backend="cuda-magic")
    with pytest.raises(ValueError, match="prefix weights cover"):
        prefix_mse(x, sparse_from_dense(f), W, b, PrefixWeights.every_prefix(N + 1))
    with pytest.raises(ValueError, match="shape mismatch"):
        prefix_mse(x[:, :3], sparse_from_dense(f), W, b, WEIGHTS["every"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_consume_grads_allows_exactly_one_backward(backend):
    x, f, W, b = random_problem(n=N)
    w = WEIGHTS["groups"]
    ref = torch.autograd.grad(prefix_mse(x, sparse_from_dense(f), W, b, w, backend="torch").loss, [W])[0]
    out = prefix_mse(x, sparse_from_dense(f), W, b, w, backend=backend, consume_grads=True)
    out.loss.backward(retain_graph=True)
    torch.testing.assert_close(W.grad, ref)
    if backend == "fused":
        with pytest.raises(RuntimeError, match="one backward pass"):
            out.loss.backward()


def test_kernel_libraries_load_only_when_a_kernel_runs():
    """Importing the package (and its toy models) loads neither numba, triton nor matplotlib;
    the first fused CPU loss loads numba."""
    code = (
        "import sys, torch, matryoshka_plugin, matryoshka_plugin.toy\n"
        "libs = lambda: sorted(m for m in ('numba', 'triton', 'matplotlib') if m in sys.modules)\n"
        "print(libs())\n"
        "from matryoshka_plugin import PrefixWeights, prefix_mse\n"
        "from matryoshka_plugin.sparse_latents import sparse_from_dense\n"
        "f = torch.eye(3)\n"
        "prefix_mse(f, sparse_from_dense(f), f, torch.zeros(3), PrefixWeights.every_prefix(3))\n"
        "print(libs())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    before, after = out.stdout.strip().splitlines()[-2:]
    assert before == "[]"
    assert after == ("['numba']" if HAS_NUMBA else "[]")
