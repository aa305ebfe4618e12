"""The Triton prefix-loss kernel against the torch reference.

On a CUDA machine with triton this runs on the GPU (fp32 and bf16). Elsewhere, or wherever
``TRITON_INTERPRET=1`` is set, it runs the same kernel on CPU tensors in Triton's interpreter.
Either way the check runs in a subprocess, because ``TRITON_INTERPRET`` must be set (or unset)
before triton is imported; this module only asks whether triton is installed. Without triton
it is skipped (the ``test`` extra and the CPU lock install it on Linux x86-64, so CI runs it in
the interpreter; see docs/development.md).
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

CHECK = textwrap.dedent(
    """
    import sys, torch
    from matryoshka_plugin.kernels.triton import triton_prefix_mse
    from matryoshka_plugin.prefix_loss import prefix_mse
    from matryoshka_plugin.prefixes import PrefixWeights
    from matryoshka_plugin.sparse_latents import sparse_from_flat

    device, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    g = torch.Generator().manual_seed(0)
    B, n, d, k = 24, 64, 40, 5
    x = torch.randn(B, d, generator=g)
    W = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    b = torch.randn(d, generator=g)
    pre = torch.randn(B, n, generator=g).relu()
    flat = torch.topk(pre.flatten(), B * k).indices
    flat = flat[torch.arange(flat.numel()) != 7]  # uneven rows
    for weights in (PrefixWeights.fixed_groups([8, 24, 32]).balanced(0.5), PrefixWeights.every_prefix(n),
                    PrefixWeights.pareto_expected(n)):
        outs = []
        for impl in ("torch", "triton"):
            xx, WW, bb = (t.to(device, dtype).requires_grad_() for t in (x, W, b))
            vals = pre.flatten()[flat].to(device, dtype).requires_grad_()
            lat = sparse_from_flat(flat.to(device), vals, B, n)
            if impl == "torch":
                loss, resid = prefix_mse(xx, lat, WW, bb, weights, backend="torch")
            else:
                loss, resid = triton_prefix_mse(xx, lat, WW, bb, weights.cum.to(device), block_d=16)
            grads = torch.autograd.grad(loss * 2.0, [xx, vals, WW, bb])
            outs.append([loss.detach(), resid] + list(grads))
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
        for name, a, c in zip(["loss", "resid", "x", "values", "W_dec", "b_dec"], *outs):
            torch.testing.assert_close(a.float(), c.float(), msg=name, **tol)
    # The self-check that gates backend="auto" accepts the kernel (on CPU tensors the
    # interpreted kernel stands in for numba's).
    from matryoshka_plugin import kernels
    if device == "cuda":
        assert kernels.kernel_trusted(device, dtype), kernels._CHECKS
    else:
        with kernels.replace_kernel("cpu", kernels._triton_run, "triton", kernels.TRITON_DTYPES):
            assert kernels.kernel_trusted("cpu", dtype), kernels._CHECKS
    print("ok")
    """
)


def _run(device, dtype, interpret):
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", CHECK, device, dtype], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (scripts/setup.sh leaves it out)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_kernel_matches_reference(dtype):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        _run("cuda", dtype, interpret=False)
    else:
        _run("cpu", dtype, interpret=True)
