"""Cases of ``test_nonfinite.py``, run as a script in a subprocess so that a crash (SIGSEGV,
a heap corruption abort) ends this process, not pytest.

    python tests/nonfinite_cases.py BACKEND PATH [CASE ...]

``BACKEND`` is ``torch``, ``fused`` or ``auto`` (set as ``MATRYOSHKA_BACKEND`` by the caller, so
every public entry point resolves ``"auto"`` to it); ``PATH`` is ``serial`` or ``parallel``
(the numba kernels' two compilations). With no ``CASE`` every case runs. Output: one line
``CASES name ...``, then ``START name`` before and ``END name outcome`` after each case, where
the outcome is ``ok`` or the name of the exception raised (and its message), and last
``LOADED numba`` or ``LOADED -`` (whether numba was imported). A case whose ``START`` has no
``END`` crashed the process.
"""

from __future__ import annotations

import sys
import traceback

import torch

BACKEND, PATH = sys.argv[1], sys.argv[2]
KINDS = ("nan", "inf", "-inf", "huge", "denormal")
NONFINITE = ("nan", "inf", "-inf")
LAYOUTS = ("scattered", "row")


def special(kind: str, dtype: torch.dtype) -> float:
    if kind == "huge":
        return 1e38 if dtype == torch.float32 else 1e307
    if kind == "denormal":
        return 1e-40 if dtype == torch.float32 else 1e-310
    return float(kind)


def fuzz(t: torch.Tensor, kind: str, layout: str, seed: int) -> torch.Tensor:
    """A copy of ``t`` with ``kind`` values at random positions: about 3% of the entries, or
    one whole row (the first dimension)."""
    g = torch.Generator().manual_seed(seed)
    out = t.detach().clone()
    value = special(kind, t.dtype)
    if layout == "row" and out.ndim > 1:
        out[int(torch.randint(out.shape[0], (1,), generator=g))] = value
    else:
        flat = out.view(-1)
        pick = torch.randint(flat.numel(), (max(1, flat.numel() // 32),), generator=g)
        flat[pick] = value
    return out


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


CASES: dict[str, tuple] = {}  # name -> (function, allowed outcomes)


def case(name: str, allowed: set[str]):
    def register(fn):
        CASES[name] = (fn, allowed)
        return fn

    return register


# -- public entry points ------------------------------------------------------------------

D, N, B, K = 32, 4096, 64, 8  # B * N = 2**18 entries: the batch top-k samples its cut-off


def topk_sae():
    from matryoshka_plugin import MatryoshkaBatchTopKSAE

    torch.manual_seed(0)
    return MatryoshkaBatchTopKSAE(D, N, k=K, group_sizes=[1024, 3072])


def log_sae():
    from matryoshka_plugin import MatryoshkaLogSparsitySAE

    torch.manual_seed(0)
    return MatryoshkaLogSparsitySAE(D, N)


def topk_trainer():
    from matryoshka_plugin import MatryoshkaBatchTopKTrainer

    return MatryoshkaBatchTopKTrainer(steps=20, activation_dim=D, dict_size=N, k=K, group_fractions=[0.25, 0.75],
                                      warmup_steps=2, device="cpu", seed=0, b_dec_init="zeros")


def log_trainer():
    from matryoshka_plugin import MatryoshkaLogSparsityTrainer

    return MatryoshkaLogSparsityTrainer(steps=20, activation_dim=D, dict_size=N, target_l0=8, warmup_steps=2,
                                        device="cpu", seed=0)


def _register_public():
    for kind in KINDS:
        bad = kind in NONFINITE
        for layout in LAYOUTS:
            tag = f"{kind}-{layout}"
            x = lambda kind=kind, layout=layout: fuzz(randn(B, D), kind, layout, seed=1)  # noqa: E731
            for sae_name, make in (("topk", topk_sae), ("log", log_sae)):
                case(f"{sae_name}.encode/{tag}", {"ActivationError"} if bad else {"ok"})(
                    lambda make=make, x=x: make().encode(x()))
                case(f"{sae_name}.forward/{tag}", {"ActivationError"} if bad else {"ok"})(
                    lambda make=make, x=x: make()(x().reshape(4, B // 4, D)))  # 3-D input too
                case(f"{sae_name}.decode/{tag}", {"ok"})(
                    lambda make=make, kind=kind, layout=layout: make().decode(
                        fuzz(randn(B, N).relu_(), kind, layout, seed=2)))
            if kind == "huge":  # a finite batch whose loss overflows: refused, or caught by the loss check
                allowed = {"ok", "TrainingError", "ActivationError"}
            else:
                allowed = {"ActivationError"} if bad else {"ok"}
            for tr_name, make in (("topk", topk_trainer), ("log", log_trainer)):
                case(f"{tr_name}.update/{tag}", allowed)(lambda make=make, x=x: make().update(0, x()))
                case(f"{tr_name}.update-weights/{tag}", {"ok", "TrainingError"})(
                    lambda make=make, kind=kind, layout=layout: _update_with_weights(make, kind, layout))
            case(f"batch_topk_select/{tag}", {"ok"})(lambda kind=kind, layout=layout: _select(kind, layout))
            case(f"prefix_mse/{tag}", {"ok"})(lambda kind=kind, layout=layout: _prefix(kind, layout))


def _update_with_weights(make, kind, layout):
    """Weights that turned non-finite (or extreme) reach the selection and the loss: the loss
    check stops the step by name, nothing crashes."""
    tr = make()
    with torch.no_grad():
        tr.ae.W_enc.copy_(fuzz(tr.ae.W_enc, kind, layout, seed=3))
    tr.update(0, randn(B, D, seed=4))
    if kind in NONFINITE:
        raise AssertionError("a step with non-finite encoder weights went through")


def _select(kind, layout):
    """The selection against the full ``torch.topk`` (NaN ranks above every number there)."""
    from matryoshka_plugin.sparse_encoder import batch_topk_select

    scores = fuzz(randn(B, N).relu_(), kind, layout, seed=5)
    count = B * K
    got = batch_topk_select(scores, count)
    want = torch.topk(scores.flatten(), count).indices
    assert got.numel() == count and bool((got[1:] > got[:-1]).all())
    a = torch.sort(scores.flatten()[got]).values
    b = torch.sort(scores.flatten()[want]).values
    torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)


def _prefix(kind, layout):
    from matryoshka_plugin.prefix_loss import prefix_mse
    from matryoshka_plugin.prefixes import PrefixWeights
    from matryoshka_plugin.sparse_latents import sparse_from_flat

    n = 256
    x = fuzz(randn(B, D), kind, layout, seed=6).requires_grad_()
    W = torch.nn.functional.normalize(randn(n, D, seed=7), dim=1)
    W = fuzz(W, kind, "scattered", seed=8).requires_grad_()
    pre = randn(B, n, seed=9).relu_()
    flat = torch.topk(pre.flatten(), B * 4).indices
    vals = fuzz(pre.flatten()[flat], kind, "scattered", seed=10).requires_grad_()
    b = torch.zeros(D, requires_grad=True)
    loss, resid = prefix_mse(x, sparse_from_flat(flat, vals, B, n), W, b, PrefixWeights.fixed_groups([64, 192]))
    loss.backward()
    if kind in NONFINITE and bool(torch.isfinite(loss)):
        raise AssertionError(f"finite loss {float(loss)} from {kind} targets")


# -- the kernels, called directly ----------------------------------------------------------


def _register_kernels():
    for dtype in (torch.float32, torch.float64):
        dt = str(dtype).split(".")[1]
        for kind in KINDS:
            for layout in LAYOUTS:
                tag = f"{kind}-{layout}-{dt}"
                case(f"kernel.above/{tag}", {"ok"})(lambda k=kind, l=layout, t=dtype: _above(k, l, t, 0.5))
                case(f"kernel.column_accumulate/{tag}", {"ok"})(
                    lambda k=kind, l=layout, t=dtype: _column_accumulate(k, l, t))
                case(f"kernel.project_out_rows_/{tag}", {"ok"})(lambda k=kind, l=layout, t=dtype: _rows(k, l, t, True))
                case(f"kernel.normalise_rows_/{tag}", {"ok"})(lambda k=kind, l=layout, t=dtype: _rows(k, l, t, False))
                case(f"kernel.numba_prefix_mse/{tag}", {"ok"})(
                    lambda k=kind, l=layout, t=dtype: _numba_prefix(k, l, t))
            case(f"kernel.above/cutoff-{kind}-{dt}", {"ok"})(lambda k=kind, t=dtype: _above(k, "scattered", t, k))
    # Malformed structure is refused before the kernels index with it.
    case("kernel.column_accumulate/index-out-of-range", {"IndexError"})(lambda: _column_accumulate("nan", "row", torch.float32, bad_index=True))
    case("kernel.numba_prefix_mse/index-out-of-range", {"IndexError"})(lambda: _numba_prefix("nan", "row", torch.float32, bad_index=True))


def _above(kind, layout, dtype, cutoff):
    from matryoshka_plugin.kernels.numba import above

    flat = fuzz(randn(1 << 16, dtype=dtype).relu_(), kind, layout, seed=11).reshape(-1)
    cutoff = special(cutoff, dtype) if isinstance(cutoff, str) else cutoff
    idx, vals = above(flat, cutoff)
    ref = torch.nonzero(~(flat <= cutoff)).squeeze(1)
    assert torch.equal(idx, ref), (idx.numel(), ref.numel())
    torch.testing.assert_close(vals, flat[ref], equal_nan=True, rtol=0, atol=0)


def _column_accumulate(kind, layout, dtype, bad_index=False):
    from matryoshka_plugin.kernels.numba import column_accumulate

    d, n, rows, E = 24, 300, 40, 500
    g = torch.Generator().manual_seed(12)
    indices = torch.randint(n, (E,), generator=g)
    if bad_index:
        indices[7] = n + 1000
    src_row = torch.randint(rows, (E,), generator=g)
    coef = fuzz(randn(E, dtype=dtype), kind, "scattered", seed=13)
    src = fuzz(randn(rows, d, dtype=dtype), kind, layout, seed=14)
    out = torch.empty(d, n, dtype=dtype)
    column_accumulate(out, indices, coef, src_row, src)


def _rows(kind, layout, dtype, project):
    from matryoshka_plugin.kernels.numba import normalise_rows_, project_out_rows_

    W = fuzz(randn(300, 24, dtype=dtype), kind, layout, seed=15)
    if project:
        project_out_rows_(fuzz(randn(300, 24, seed=16, dtype=dtype), kind, "scattered", seed=17), W)
    else:
        normalise_rows_(W, torch.finfo(dtype).eps)


def _numba_prefix(kind, layout, dtype, bad_index=False):
    from matryoshka_plugin.kernels.numba import numba_prefix_mse
    from matryoshka_plugin.prefixes import PrefixWeights
    from matryoshka_plugin.sparse_latents import sparse_from_flat

    rows, n, d = 48, 200, 24
    x = fuzz(randn(rows, d, dtype=dtype), kind, layout, seed=18).requires_grad_()
    W = fuzz(randn(n, d, seed=19, dtype=dtype), kind, "scattered", seed=20).requires_grad_()
    b = torch.zeros(d, dtype=dtype, requires_grad=True)
    pre = randn(rows, n, seed=21, dtype=dtype).relu_()
    flat = torch.topk(pre.flatten(), rows * 5).indices
    vals = fuzz(pre.flatten()[flat], kind, "scattered", seed=22).requires_grad_()
    for weights in (PrefixWeights.fixed_groups([40, 160]), PrefixWeights.every_prefix(n)):
        lat = sparse_from_flat(flat, vals, rows, n)
        if bad_index:
            lat = lat._replace(indices=lat.indices.clone().index_fill_(0, torch.tensor([3]), n))
        loss, _ = numba_prefix_mse(x, lat, W, b, weights.cum, 1 << 10)  # small chunks: several passes
        loss.backward()


def main() -> None:
    if PATH == "parallel":
        torch.set_num_threads(2)
    else:
        torch.set_num_threads(1)
    _register_public()
    if BACKEND != "torch":  # backend="torch" must not import numba: leave it alone
        from matryoshka_plugin.kernels import numba_available

        if numba_available():
            from matryoshka_plugin.kernels import numba as kernels

            kernels.PARALLEL_MIN_WORK = 0 if PATH == "parallel" else 1 << 62
            if BACKEND == "fused":
                _register_kernels()
    names = sys.argv[3:] or list(CASES)
    print("CASES", " ".join(CASES), flush=True)
    for name in names:
        fn, allowed = CASES[name]
        print("START", name, flush=True)
        try:
            fn()
            outcome, detail = "ok", ""
        except Exception as exc:  # the outcome is what is checked
            outcome, detail = type(exc).__name__, " ".join(str(exc).split())[:300]
            if outcome not in allowed:
                detail += " | " + " ".join(traceback.format_exc().split())[-600:]
        verdict = "pass" if outcome in allowed else "FAIL"
        print("END", name, verdict, outcome, detail, flush=True)
    print("LOADED", "numba" if "numba" in sys.modules else "-", flush=True)


if __name__ == "__main__":
    main()
