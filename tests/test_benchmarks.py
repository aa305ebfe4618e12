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


@pytest.mark.slow  # two grid cells, each in a fresh process
def test_speed_grid_is_resumable_and_marks_missed_targets(tmp_path, capsys):
    cache = tmp_path / "grid.json"
    args = ["--grid", "--grid-cache", str(cache), "--grid-d", "16", "--grid-F", "128", "--grid-B", "64",
            "--steps", "1", "--warmup", "1"]
    first = speed.main(args + ["--grid-k", "2"])
    assert list(first) == ["cpu d=16 F=128 k=2 B=64"]
    cell = first["cpu d=16 F=128 k=2 B=64"]
    assert set(cell["seconds"]) == {"groups", "every", "pareto", "matmul"}
    assert cell["every_over_groups"] == pytest.approx(cell["seconds"]["every"] / cell["seconds"]["groups"], rel=1e-2)
    # A second run with one more k reuses the cached cell and times only the new one.
    cached = dict(cell, seconds=dict(cell["seconds"], groups=123.0), groups_over_matmul=99.0)
    speed.json.dump({"cpu d=16 F=128 k=2 B=64": cached}, open(cache, "w"))
    capsys.readouterr()
    second = speed.main(args + ["--grid-k", "2", "4"])
    assert second["cpu d=16 F=128 k=2 B=64"]["seconds"]["groups"] == 123.0
    assert "cpu d=16 F=128 k=4 B=64" in second
    out = capsys.readouterr().out
    assert "| 16 | 128 | 2 | 64 | 123.000 |" in out and "**99.00** ✗" in out
