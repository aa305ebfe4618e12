"""Freed host memory reused between steps: page faults counted in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import matryoshka_plugin.trainers.common as common
from matryoshka_plugin import MatryoshkaBatchTopKTrainer
from matryoshka_plugin.host_memory import ENV_VAR

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "matryoshka_plugin" / "host_memory.py"

# Load the module by path (the package's own imports take seconds), apply it, then allocate,
# touch and free a 64 MiB tensor (above glibc's largest mmap threshold, 32 MiB) 16 times;
# minor page faults of each round.
SCRIPT = f"""
import importlib.util, json, resource, torch
spec = importlib.util.spec_from_file_location("host_memory", {str(MODULE)!r})
host_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host_memory)
applied = host_memory.reuse_freed_memory()
faults = []
for _ in range(16):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 << 20)
    t.fill_(1.0)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({{"applied": applied, "faults": faults}}))
"""


def _run(env_value: str | None) -> dict:
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    if env_value is not None:
        env[ENV_VAR] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_reuse_makes_later_rounds_reuse_freed_pages_and_env_var_opts_out():
    on, off = _run(None), _run("0")
    assert on["applied"] is True and off["applied"] is False
    pages = (64 << 20) // 4096
    # Once freed blocks have merged into one that fits an aligned request (a few rounds: each
    # aligned allocation asks for a little more than the block just freed), the same pages
    # serve every later round without a page fault.
    assert max(on["faults"][-4:]) < pages // 100, on
    if not _thp_always():  # with 4 KiB pages every fresh mapping faults each page in
        assert min(off["faults"][-4:]) > pages // 2, off


def test_trainer_on_cpu_applies_it(monkeypatch):
    seen = []
    monkeypatch.setattr(common, "reuse_freed_memory", lambda: seen.append(1) or True)
    MatryoshkaBatchTopKTrainer(steps=10, warmup_steps=1, activation_dim=8, dict_size=16, k=2, layer=0, lm_name="t",
                               device="cpu", group_fractions=[0.5, 0.5])
    assert len(seen) == 1
