"""Freed host memory reused between steps, only on request: page faults counted in fresh processes,
mallopt calls recorded in this one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import matryoshka_plugin
import matryoshka_plugin.host_memory as host_memory
from matryoshka_plugin import MatryoshkaBatchTopKTrainer, MatryoshkaLogSparsityTrainer
from matryoshka_plugin.host_memory import ENV_VAR

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "matryoshka_plugin" / "host_memory.py"

# Allocate, touch and free a 64 MiB tensor (above glibc's largest mmap threshold, 32 MiB) 16
# times; minor page faults of each round.
ROUNDS = """
import json, resource, torch
faults = []
for _ in range(16):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 << 20)
    t.fill_(1.0)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"applied": applied, "faults": faults}))
"""
# The module loaded by path (the package's own imports take seconds), then asked to apply.
APPLY = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("host_memory", {str(MODULE)!r})
host_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host_memory)
applied = host_memory.reuse_host_memory()
""" + ROUNDS
# The package imported and a CPU trainer built, as a pipeline would; nothing asked for.
BUILD = """
import matryoshka_plugin.host_memory as host_memory
from matryoshka_plugin import MatryoshkaBatchTopKTrainer
MatryoshkaBatchTopKTrainer(steps=10, activation_dim=8, dict_size=16, k=2, device="cpu", group_fractions=[0.5, 0.5])
applied = host_memory._applied  # None: mallopt never called
""" + ROUNDS

PAGES = (64 << 20) // 4096


def _run(script: str, env_value: str | None) -> dict:
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    if env_value is not None:
        env[ENV_VAR] = env_value
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def _reused(faults: list[int]) -> bool:
    # Once freed blocks have merged into one that fits an aligned request (a few rounds: each
    # aligned allocation asks for a little more than the block just freed), the same pages
    # serve every later round without a page fault.
    return max(faults[-4:]) < PAGES // 100


def _fresh_pages(faults: list[int]) -> bool:
    return min(faults[-4:]) > PAGES // 2  # with 4 KiB pages every fresh mapping faults each page in


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_reuse_makes_later_rounds_reuse_freed_pages_and_env_var_zero_vetoes_it():
    on, vetoed = _run(APPLY, None), _run(APPLY, "0")
    assert on["applied"] is True and vetoed["applied"] is False
    assert _reused(on["faults"]), on
    if not _thp_always():
        assert _fresh_pages(vetoed["faults"]), vetoed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_building_a_trainer_leaves_malloc_alone_by_default():
    got = _run(BUILD, None)
    assert got["applied"] is None, got
    if not _thp_always():
        assert _fresh_pages(got["faults"]), got


@pytest.fixture
def recorded_mallopt(monkeypatch):
    """This process's host_memory as if never applied, with a mallopt that only records."""
    calls: list[tuple[int, int]] = []

    class FakeMallopt:
        argtypes = None

        def __call__(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(host_memory, "_applied", None)
    monkeypatch.setattr(host_memory, "_glibc_mallopt", FakeMallopt)
    monkeypatch.delenv(ENV_VAR, raising=False)
    return calls


def _build_both() -> None:
    MatryoshkaBatchTopKTrainer(steps=10, activation_dim=8, dict_size=16, k=2, device="cpu", group_fractions=[0.5, 0.5])
    MatryoshkaLogSparsityTrainer(steps=10, activation_dim=8, dict_size=16, target_l0=2, device="cpu")


def test_trainers_do_not_call_mallopt_unless_asked(recorded_mallopt, monkeypatch):
    _build_both()
    assert recorded_mallopt == []
    monkeypatch.setenv(ENV_VAR, "1")  # the documented opt-in for pipelines that only build trainers
    _build_both()
    assert recorded_mallopt == [(-1, 2**31 - 1), (-4, 0)]  # M_TRIM_THRESHOLD, M_MMAP_MAX; once per process


def test_the_public_function_opts_in(recorded_mallopt):
    assert matryoshka_plugin.reuse_host_memory() is True
    assert matryoshka_plugin.reuse_host_memory() is True
    assert recorded_mallopt == [(-1, 2**31 - 1), (-4, 0)]
