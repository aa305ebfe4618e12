"""No input, finite or not, crashes the process (issue 24, item 1).

NaN, +-Inf, huge and denormal values at random positions (and in a whole row) go through every
public entry point (both SAEs' ``encode``/``forward``/``decode``, both trainers' ``update``, with
clean input on non-finite weights too, ``batch_topk_select``, ``prefix_mse``) under each backend,
and through every numba kernel directly on both of its compilations (serial, parallel).
Public entry points refuse non-finite activations with ``ActivationError`` (a diverged trainer
stops with ``TrainingError``); kernels may return garbage for such values, but must stay in
bounds. The cases run in a subprocess (``nonfinite_cases.py``) so that a crash, which is what
one NaN row caused in the batch top-k's cut-off kernel, is a failure naming the case.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from matryoshka_plugin.kernels import numba_available

SCRIPT = Path(__file__).with_name("nonfinite_cases.py")


def run_cases(backend: str, path: str) -> tuple[dict[str, str], list[str]]:
    """Every case's verdict line, in as few subprocesses as crashes allow: after a crash the
    case that started without ending is recorded as crashed, and the rest run in a fresh one."""
    env = {**os.environ, "MATRYOSHKA_BACKEND": backend, "OMP_NUM_THREADS": "2"}
    results: dict[str, str] = {}
    names: list[str] | None = None
    extra: list[str] = []
    for _ in range(8):
        todo = [] if names is None else [n for n in names if n not in results]
        out = subprocess.run([sys.executable, str(SCRIPT), backend, path, *todo], env=env,
                             capture_output=True, text=True, timeout=600)
        started = None
        for line in out.stdout.splitlines():
            tag, _, rest = line.partition(" ")
            if tag == "CASES":
                names = rest.split()
            elif tag == "START":
                started = rest
            elif tag == "END":
                name, _, verdict = rest.partition(" ")
                results[name], started = verdict, None
            elif tag == "LOADED":
                extra.append(rest)
        if out.returncode == 0 and started is None:
            break
        if started is None:  # died outside a case (an import error, say)
            pytest.fail(f"the case script exited with {out.returncode}: {out.stderr[-3000:]}")
        results[started] = f"FAIL crashed the process (exit status {out.returncode}): {out.stderr[-300:]!r}"
        if all(n in results for n in names):
            break
    for name in names or []:
        results.setdefault(name, "FAIL not run: too many crashes before it")
    return results, extra


@pytest.mark.slow
@pytest.mark.parametrize("path", ["serial", "parallel"])
@pytest.mark.parametrize("backend", ["torch", "fused", "auto"])
def test_no_value_crashes_or_passes_silently(backend, path):
    if backend == "fused" and not numba_available():
        pytest.skip("numba is not installed")
    results, extra = run_cases(backend, path)
    failed = {name: verdict for name, verdict in results.items() if not verdict.startswith("pass")}
    assert not failed, "\n".join(f"{name}: {verdict}" for name, verdict in failed.items())
    assert len(results) >= 100
    if backend == "torch":  # and plain torch means no numba anywhere (issue 24, item 4)
        assert extra and set(extra) == {"-"}, extra
