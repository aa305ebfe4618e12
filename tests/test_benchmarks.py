"""The speed benchmark runs end to end (tiny shapes; no timing assertions)."""

import pytest

from benchmarks import speed


@pytest.mark.slow  # imports and runs both upstream trainers
def test_speed_benchmark_smoke(capsys):
    summary = speed.main(
        ["--d", "32", "--dict-size", "256", "--k", "4", "--batch", "64", "--steps", "1", "--warmup", "1",
         "--only", "matmul", "ours_groups", "ours_every", "upstream_matryoshka"]
    )
    out = capsys.readouterr().out
    assert "| one dense encoder matmul (floor) |" in out and out.strip().splitlines()[-1].startswith("{")
    for key in ("upstream_matryoshka_over_ours", "ours_over_matmul", "every_over_groups"):
        assert summary[key] > 0
    assert set(summary["peak_mb"]) == {"matmul", "ours_groups", "ours_every", "upstream_matryoshka"}
