"""The command line on bad input: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from matryoshka_plugin.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_export_with_missing_or_unreadable_activations(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(tmp_path), str(out), "--activations", str(tmp_path / "missing.pt")]) == 2
    assert one_error_line(capsys).endswith(f"error: --activations: no such file: {tmp_path / 'missing.pt'}")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    assert main(["export", str(tmp_path), str(out), "--activations", str(bad)]) == 2
    assert f"cannot read {bad}" in one_error_line(capsys)
    torch.save({"a": 1}, tmp_path / "dict.pt")
    assert main(["export", str(tmp_path), str(out), "--activations", str(tmp_path / "dict.pt")]) == 2
    assert one_error_line(capsys).endswith(f"--activations: {tmp_path / 'dict.pt'} does not hold a tensor")
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--saes", "bogus"], r"unknown demo SAE\(s\) \['bogus'\]"),
        (["--saes", "vanilla", "vanilla"], "name each demo SAE once"),
        (["--steps", "0"], "steps must be a positive integer, got 0"),
        (["--steps", "-5"], "steps must be a positive integer, got -5"),
    ],
)
def test_demo_bad_settings(tmp_path, capsys, args, message):
    import re

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *args]) == 2
    assert re.search(message, one_error_line(capsys))
    assert not out.exists()


@pytest.mark.slow  # a fresh process imports torch and dictionary_learning
def test_bad_input_in_a_real_process(tmp_path):
    """``python -m matryoshka_plugin``: exit status 2 and one line, as argparse reports bad arguments."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "matryoshka_plugin", "demo", "--steps", "0", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["python -m matryoshka_plugin: error: steps must be a positive integer, got 0"]
    assert not out.exists()
