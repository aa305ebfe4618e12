"""Fused kernels of the sparse training path, and the one place that decides which
implementation runs: a kernel or its plain torch counterpart.

* :mod:`.numba` (CPU, float32/float64): the all-prefix loss in one pass per token, the encoder's
  sparse weight gradient (``column_accumulate``), the batch top-k's cut-off pass (``above``)
  and the decoder's row projection and normalisation (``project_out_rows_``,
  ``normalise_rows_``).
* :mod:`.triton` (CUDA, float32/bfloat16/float16): the all-prefix loss.
* :mod:`.reference`: the plain torch counterpart of every kernel, for any device and dtype;
  it runs wherever no kernel does and is what the self-checks and tests compare with.

:data:`KERNELS` is the one registry (kernel name -> device type -> :class:`FusedKernel`) and
:func:`fused_op` the one rule every caller asks, with the ``backend`` it was given:
``"torch"`` runs plain torch and imports neither numba nor triton; ``"fused"`` runs the kernel
unchecked wherever it covers the tensors; ``"auto"`` (the default) takes the environment
variable ``MATRYOSHKA_BACKEND`` when it is set, else runs the kernel that covers the tensors'
device and dtype once it has checked itself there. numba and triton are optional (the ``cpu``
and ``gpu`` extras) and imported only when a kernel is about to run, so importing the package
stays cheap; where one is missing, plain torch runs and a :class:`KernelUnavailableWarning`
says so once per process.

A fused kernel is trusted on a device only after it has checked itself: on its first use per
(kernel, device, dtype) under ``backend="auto"``, :func:`kernel_trusted` runs it and its torch
reference on a small random problem and compares every output (and, for the prefix loss, every
gradient). On a mismatch, or if the kernel fails to compile or launch, it warns once (naming
the kernel, the device and the largest error) and the torch path runs there from then on.
:func:`replace_kernel` swaps a kernel in for a block (tests inject faulty kernels through it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ..prefixes import PrefixWeights
from ..sparse_latents import SparseLatents, sparse_from_flat
from .reference import REFERENCES

__all__ = [
    "BACKENDS",
    "PREFIX_MSE",
    "numba_available",
    "triton_available",
    "scale_grad_once",
    "scale_grads_once",
    "FusedKernel",
    "KERNELS",
    "fused_op",
    "KernelSelfCheckWarning",
    "KernelUnavailableWarning",
    "kernel_trusted",
    "self_check_error",
    "replace_kernel",
]

BACKENDS = ("auto", "torch", "fused")

NUMBA_DTYPES = (torch.float32, torch.float64)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def numba_available() -> bool:
    """Whether numba imports (and with it the CPU kernels)."""
    try:
        from . import numba  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (and with it the CUDA kernel)."""
    try:
        from . import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _uniform(tensors: tuple[torch.Tensor, ...], device_type: str, dtypes: tuple[torch.dtype, ...]) -> bool:
    """All ``tensors`` on ``device_type`` with one dtype out of ``dtypes``."""
    if not tensors:
        return False
    dtype = tensors[0].dtype
    return dtype in dtypes and all(t.device.type == device_type and t.dtype == dtype for t in tensors)


def _numba_run(x, latents, W_dec, b_dec, cum, chunk_elements, consume):
    from .numba import DEFAULT_WORK_ELEMENTS, numba_prefix_mse

    return numba_prefix_mse(x, latents, W_dec, b_dec, cum, chunk_elements or DEFAULT_WORK_ELEMENTS, consume)


def _triton_run(x, latents, W_dec, b_dec, cum, chunk_elements, consume):
    from .triton import triton_prefix_mse

    return triton_prefix_mse(x, latents, W_dec, b_dec, cum, consume=consume)


@dataclass(frozen=True)
class FusedKernel:
    """One fused kernel on one device type.

    ``run`` takes the arguments of its torch counterpart in :data:`.reference.REFERENCES` and
    returns (or writes in place) what it does; the prefix loss's
    ``run(x, latents, W_dec, b_dec, cum, chunk_elements, consume)`` returns ``(loss, residual)``
    like ``prefix_loss.prefix_mse`` (differentiable in ``x``, ``latents.values``, ``W_dec``,
    ``b_dec``). ``name`` is the library it needs (``available()`` says whether that imports),
    ``dtypes`` those it handles, ``contiguous`` whether it needs contiguous tensors (the
    in-place kernels write through raw buffers).
    """

    name: str
    dtypes: tuple[torch.dtype, ...]
    available: Callable[[], bool]
    run: Callable[..., Any]
    contiguous: bool = False


def _numba_op(name: str) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        from . import numba

        return getattr(numba, name)(*args)

    run.__name__ = name
    return run


PREFIX_MSE = "prefix_mse"

# Every kernel, by name and device type. Each name's torch counterpart is
# ``reference.REFERENCES[name]``: ``prefix_mse(x, latents, W_dec, b_dec, cum, chunk_elements,
# consume)``, ``above(flat, cutoff)``, ``column_accumulate(out, indices, coef, src_row, src)``,
# ``project_out_rows_(grad, W)``, ``normalise_rows_(W, eps)``.
KERNELS: dict[str, dict[str, FusedKernel]] = {
    PREFIX_MSE: {
        "cpu": FusedKernel("numba", NUMBA_DTYPES, numba_available, _numba_run),
        "cuda": FusedKernel("triton", TRITON_DTYPES, triton_available, _triton_run),
    },
    **{
        op: {"cpu": FusedKernel("numba", NUMBA_DTYPES, numba_available, _numba_op(op), contiguous=True)}
        for op in ("above", "column_accumulate", "project_out_rows_", "normalise_rows_")
    },
}


class KernelSelfCheckWarning(RuntimeWarning):
    """A fused kernel disagreed with the torch reference (or failed) on a device: torch runs there."""


class KernelUnavailableWarning(RuntimeWarning):
    """A fused kernel would have run but its library (numba, triton) does not import: torch runs."""


_INSTALL = {"numba": "pip install 'matryoshka_plugin[cpu]'", "triton": "pip install 'matryoshka_plugin[gpu]'"}
# Libraries whose absence has been reported (once per process). Guarded by _CHECK_LOCK.
_UNAVAILABLE_SAID: set[str] = set()


# (kernel, device, dtype) -> max relative error of the self-check (inf: the kernel raised).
# Guarded by _CHECK_LOCK: trainers may call the loss from several threads.
_CHECKS: dict[tuple[str, str, torch.dtype], float] = {}
_CHECK_LOCK = threading.RLock()
# Largest error, relative to each tensor's largest magnitude, that the self-check accepts.
SELF_CHECK_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _self_check_problem(device: torch.device, dtype: torch.dtype):
    """A small random problem that reaches every branch of the kernels: uneven rows (one token
    with no active latent), ``d`` not a multiple of a tile, a prefix weight on every length."""
    g = torch.Generator().manual_seed(1234)
    B, n, d, k = 12, 48, 37, 5
    x = torch.randn(B, d, generator=g)
    W = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    b = 0.1 * torch.randn(d, generator=g)
    pre = torch.rand(B, n, generator=g)
    pre[3] = -1.0  # token 3 keeps no latent
    flat = torch.topk(pre.flatten(), B * k).indices
    flat = flat[torch.arange(flat.numel()) % 7 != 2]
    vals = pre.flatten()[flat]
    lam = torch.rand(n + 1, generator=g, dtype=torch.float64)
    cum = PrefixWeights(lam).cum.to(device)
    tensors = [t.to(device, dtype) for t in (x, W, b, vals)]
    return tensors, flat.to(device), B, n, cum


def _relative_error(refs: list[torch.Tensor], gots: list[torch.Tensor]) -> float:
    """Largest ``|ref - got|`` relative to each reference's largest magnitude; a shape mismatch
    or a NaN counts as infinite."""
    worst = 0.0
    for ref, got in zip(refs, gots):
        ref, got = ref.double(), got.double()
        if ref.shape != got.shape:
            return float("inf")
        if ref.numel() == 0:
            continue
        err = float((ref - got).abs().max()) / max(float(ref.abs().max()), 1e-12)
        worst = max(worst, err if err == err else float("inf"))  # NaN counts as a failure
    return worst


def _prefix_mse_error(kernel: FusedKernel, device: torch.device, dtype: torch.dtype) -> float:
    outs = []
    # The check runs wherever the first call happens (eval, autocast): it needs gradients and
    # the dtype it was asked about.
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        if device.type in ("cpu", "cuda"):
            stack.enter_context(torch.autocast(device.type, enabled=False))
        (x0, W0, b0, v0), flat, B, n, cum = _self_check_problem(device, dtype)
        for run in (REFERENCES[PREFIX_MSE], kernel.run):
            x, W, b, v = (t.detach().clone().requires_grad_() for t in (x0, W0, b0, v0))
            lat = sparse_from_flat(flat, v, B, n)
            loss, resid = run(x, lat, W, b, cum, 1 << 16, False)
            grads = torch.autograd.grad(loss * 1.5, [x, lat.values, W, b])
            outs.append([loss.detach(), resid.detach(), *grads])
    return _relative_error(*outs)


def _op_problem(op: str, device: torch.device, dtype: torch.dtype) -> tuple:
    """Arguments for ``op`` on a small random problem: ties at the cut-off and uneven pieces
    (``above``), latents without entries and a width that is not a multiple of a tile
    (``column_accumulate``), a zero row (the row operations)."""
    g = torch.Generator().manual_seed(1234)
    if op == "above":
        flat = torch.rand(3001, generator=g)
        flat[::7] = 0.5  # ties at the cut-off stay out
        return (flat.to(device, dtype), 0.5)
    if op == "column_accumulate":
        d, n, rows, entries = 37, 53, 12, 150
        indices = torch.randint(n - 5, (entries,), generator=g)  # the last latents have none
        src_row = torch.randint(rows, (entries,), generator=g)
        coef, src = torch.randn(entries, generator=g), torch.randn(rows, d, generator=g)
        return (torch.full((d, n), float("nan")).to(device, dtype), indices.to(device), coef.to(device, dtype),
                src_row.to(device), src.to(device, dtype))
    W = torch.randn(53, 37, generator=g)
    W[4] = 0.0
    if op == "project_out_rows_":
        return (torch.randn(53, 37, generator=g).to(device, dtype), W.to(device, dtype))
    return (W.to(device, dtype), torch.finfo(dtype).eps)


def _op_error(op: str, kernel: FusedKernel, device: torch.device, dtype: torch.dtype) -> float:
    outs = []
    with torch.inference_mode(False), torch.no_grad():
        for run in (REFERENCES[op], kernel.run):
            args = _op_problem(op, device, dtype)
            result = run(*args)
            # In-place kernels: what they wrote into their first argument.
            outs.append(list(result) if result is not None else [args[0]])
    if op == "above" and not all(torch.equal(a, b) for a, b in zip(*outs)):
        return float("inf")  # a selection is exact or wrong
    return _relative_error(*outs)


def self_check_error(device: torch.device | str, dtype: torch.dtype, op: str = PREFIX_MSE) -> float:
    """Largest error of the fused kernel ``op`` (a name in :data:`KERNELS`, the prefix loss by
    default) for ``device`` against its torch reference on a small
    random problem, over every output (and the prefix loss's gradients), each relative to the
    reference's largest magnitude. Exceptions of the kernel (compile, launch) propagate."""
    device = torch.device(device)
    kernel = KERNELS[op][device.type]
    if op == PREFIX_MSE:
        return _prefix_mse_error(kernel, device, dtype)
    return _op_error(op, kernel, device, dtype)


def kernel_trusted(device: torch.device | str, dtype: torch.dtype, op: str = PREFIX_MSE) -> bool:
    """Whether the fused kernel ``op`` for ``device`` passed its self-check in ``dtype`` (run
    once per kernel, device and dtype, on first use). On failure it warns once and returns
    False from then on."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (op, str(device), dtype)
    tolerance = SELF_CHECK_TOLERANCE.get(dtype, 1e-3)
    with _CHECK_LOCK:
        if key in _CHECKS:
            return _CHECKS[key] <= tolerance
        kernel = KERNELS[op].get(device.type)
        if kernel is None:
            raise ValueError(f"no fused {op} kernel for {device.type}")
        try:
            err, why = self_check_error(device, dtype, op), None
        except Exception as exc:  # a compile or launch error: torch runs instead
            err, why = float("inf"), f"{type(exc).__name__}: {exc}"
        _CHECKS[key] = err
        ok = err <= tolerance
        if not ok:
            where = str(device)
            if device.type == "cuda":
                where += f" ({torch.cuda.get_device_name(device)})"
            problem = f"failed ({why})" if why else f"disagrees with the torch reference: max relative error {err:.3g}"
            label = "prefix-loss" if op == PREFIX_MSE else op
            warnings.warn(
                f"the fused {kernel.name} {label} kernel {problem} on {where} in {dtype}; "
                "the torch implementation runs there instead (backend='fused' forces the kernel)",
                KernelSelfCheckWarning,
                stacklevel=3,
            )
        return ok


@contextlib.contextmanager
def replace_kernel(device_type: str, run: Callable[..., Any], name: str = "replacement",
                   dtypes: tuple[torch.dtype, ...] | None = None, op: str = PREFIX_MSE) -> Iterator[FusedKernel]:
    """Use ``run`` as the fused kernel ``op`` (a name in :data:`KERNELS`, the prefix loss by
    default) on ``device_type`` inside the block (its self-checks start afresh, and are
    forgotten again on exit). ``run`` has the signature of the kernel it replaces; ``dtypes``
    default to that kernel's."""
    table, key = KERNELS[op], device_type
    if key not in table:
        raise ValueError(f"no {op} kernel on {device_type} to replace (kernels on: {sorted(table)})")
    old = table[key]
    new = FusedKernel(name, dtypes or old.dtypes, lambda: True, run, old.contiguous)
    with _CHECK_LOCK:
        table[key] = new
        _forget_checks(device_type, op)
    try:
        yield new
    finally:
        with _CHECK_LOCK:
            table[key] = old
            _forget_checks(device_type, op)


def _forget_checks(device_type: str, op: str) -> None:
    for key in [k for k in _CHECKS if k[0] == op and torch.device(k[1]).type == device_type]:
        del _CHECKS[key]


def _requested(backend: str) -> str:
    """``backend`` validated, with ``MATRYOSHKA_BACKEND`` in place of ``"auto"``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        backend = os.environ.get("MATRYOSHKA_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"MATRYOSHKA_BACKEND={backend!r} is not one of {BACKENDS}")
    return backend


def _say_unavailable(kernel: FusedKernel) -> None:
    """Warn, once per process and library, that ``kernel`` would have run but cannot."""
    with _CHECK_LOCK:
        if kernel.name in _UNAVAILABLE_SAID:
            return
        _UNAVAILABLE_SAID.add(kernel.name)
    hint = _INSTALL.get(kernel.name, f"install {kernel.name}")
    warnings.warn(
        f"{kernel.name} is not installed, so its fused kernels do not run: plain torch runs instead, "
        f"which is slower ({hint} adds them; backend='torch' or MATRYOSHKA_BACKEND=torch asks for "
        "torch without this warning)",
        KernelUnavailableWarning,
        stacklevel=4,
    )


def fused_op(op: str, backend: str, *tensors: torch.Tensor, required: bool = False) -> Callable[..., Any] | None:
    """The fused kernel ``op`` (a name in :data:`KERNELS`) to run on ``tensors``, or None where
    its torch counterpart (``reference.REFERENCES[op]``) runs. The one rule for every kernel:

    * ``backend`` is validated, and ``"auto"`` replaced by ``MATRYOSHKA_BACKEND`` when set;
    * ``"torch"``: None, and nothing is imported;
    * None where no kernel covers the tensors (their device type, one dtype it handles, contiguous
      for the in-place kernels) or its library does not import (said once, see
      :class:`KernelUnavailableWarning`); under ``"fused"`` with ``required`` (the prefix loss,
      which a caller names) that is an error instead;
    * ``"auto"``: the kernel once it has passed its self-check on the tensors' device and dtype
      (:func:`kernel_trusted`), None otherwise; ``"fused"``: the kernel, unchecked.
    """
    backend = _requested(backend)
    if backend == "torch" or not tensors:
        return None
    device, dtype = tensors[0].device, tensors[0].dtype
    kernel = KERNELS[op].get(device.type)
    covers = (kernel is not None and _uniform(tensors, device.type, kernel.dtypes)
              and (not kernel.contiguous or all(t.is_contiguous() for t in tensors)))
    if not covers or not kernel.available():
        if backend == "fused" and required:
            raise ValueError(
                f"no fused {op} kernel for these tensors (CPU needs numba and float32/float64, CUDA "
                "needs triton and float32/bfloat16/float16); use backend='torch'"
            )
        if covers:
            _say_unavailable(kernel)
        return None
    if backend == "auto" and not kernel_trusted(device, dtype, op):
        return None
    return kernel.run


def scale_grads_once(ctx: Any, grads: Sequence[torch.Tensor | None],
                     scale: torch.Tensor | float) -> list[torch.Tensor | None]:
    """``scale * grad`` for each gradient a fused kernel saved, in its backward. With
    ``ctx.consume`` the saved buffers (one decoder-sized) are scaled in place instead, which
    saves a copy but allows only one backward pass (trainers need only one); ``ctx.used``
    records that it happened. A scale of exactly 1 on the CPU (what training passes) hands the
    buffers over as they are, without a pass over them (on a GPU the check would synchronise)."""
    if ctx.consume:
        if ctx.used:
            raise RuntimeError("this prefix loss was built with consume_grads=True: one backward pass only")
        ctx.used = True
    if isinstance(scale, torch.Tensor):
        unit = scale.device.type == "cpu" and scale.numel() == 1 and float(scale) == 1.0
    else:
        unit = float(scale) == 1.0
    if unit:
        return list(grads)
    return [None if g is None else g.mul_(scale) if ctx.consume else g * scale for g in grads]


def scale_grad_once(ctx: Any, grad: torch.Tensor | None, scale: torch.Tensor | float) -> torch.Tensor | None:
    """:func:`scale_grads_once` for a single gradient."""
    return scale_grads_once(ctx, [grad], scale)[0]
