"""benchmarks.reference_family's pipeline end to end on tiny synthetic activations (not MiniLM)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace

import pytest
import torch
from helpers import low_rank_stream

from benchmarks.reference_family.pipeline import Plan, run


@pytest.mark.slow
def test_pipeline_trains_measures_reports_and_resumes(tmp_path):
    stream = low_rank_stream(d=12, n_true=32, batch=2048, seed=0)
    train, held_out = next(stream), next(stream)[:1024]
    snippets = [("left ", f"tok{i}", " right") for i in range(256)]
    plan = Plan(reference_sizes=(4, 8), large_size=64, k=3, train_tokens=1024, held_out_tokens=1024,
                batch_size=64, sample_tokens=256)
    out, report = tmp_path / "run", tmp_path / "report"
    results = run(out, plan, train, held_out, sample=(held_out[:256], snippets), report_dir=report, tree_roots=2)

    names = ["ref_4", "ref_8", "vanilla", "mat_groups", "mat_every", "log_sparsity", "log_none"]
    assert sorted(p.name for p in (out / "saes").iterdir()) == sorted(names)
    rows = list(csv.DictReader((report / "results.csv").open()))
    assert [r["sae"] for r in rows] == names
    for r in rows:  # 16 training steps: measured, not good
        assert math.isfinite(float(r["fvu"])) and float(r["fvu"]) > 0 and float(r["l0"]) > 0
    corr = results["mean_max_correlation"]
    assert set(corr) == {"vanilla", "mat_groups", "mat_every", "log_sparsity", "log_none"}
    for row in corr.values():
        for c in row.values():
            assert -1 <= c["mean"] <= 1 and len(c["max_corr"]) in (4, 8) and c["n_tokens"] == 1024
    # The nested-prefix FVU curve of the Matryoshka SAEs falls to the full SAE's FVU.
    curve = results["metrics"]["mat_groups"]["prefix_fvu"]
    assert list(curve.values())[-1] == pytest.approx(results["metrics"]["mat_groups"]["fvu"], rel=1e-5)
    md = (report / "results.md").read_text()
    assert "| Matryoshka BatchTopK, groups |" in md and "ref_8" in md
    assert (report / "mean_max_correlation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (report / "tree.html").read_text()
    assert page.count('<li class="node"') >= 2 and "tok" in page
    assert "mat_groups latents 0-1" in (report / "tree_prefixes.html").read_text()
    json.loads((report / "results.json").read_text())

    # A second run trains nothing and reuses the measurements.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "saes").glob("*/ae.pt")}
    again = run(out, plan, train, held_out, report_dir=report)
    assert again["mean_max_correlation"] == results["mean_max_correlation"]
    assert {p: p.stat().st_mtime_ns for p in (out / "saes").glob("*/ae.pt")} == stamps
    # Fewer large variants: the same folder, nothing retrained, the others' measurements kept.
    fewer = run(out, replace(plan, variants=("vanilla",)), train, held_out, report_dir=tmp_path / "r2")
    assert fewer["mean_max_correlation"] == {"vanilla": results["mean_max_correlation"]["vanilla"]}
    assert set(json.loads((out / "correlations.json").read_text())) == set(corr)
    # Another plan is not mixed into this run's folder.
    with pytest.raises(ValueError, match="another plan"):
        run(out, replace(plan, k=2), train, held_out)


def test_cli_builds_the_plan_and_folders(tmp_path, monkeypatch, capsys):
    """The command line's plan, run folder and report folder (training and MiniLM stubbed out)."""
    import benchmarks.real_model.activations as acts
    import benchmarks.reference_family.__main__ as cli
    import benchmarks.reference_family.sample as sample
    from benchmarks.reference_family.pipeline import FULL, QUICK

    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(acts, "cached_activations", lambda n, held_out, cache_dir: torch.zeros(n, 2))
    monkeypatch.setattr(sample, "aligned_sample", lambda n, path: (n, path))
    monkeypatch.setattr(cli, "run", lambda out, plan, *a, report_dir, **kw: calls.append((out, plan, report_dir)))
    cli.main(["--seed", "1", "--reference-sizes", "8", "16", "--variants", "vanilla", "mat_groups", "--threads", "1"])
    cli.main(["--quick", "--train-tokens", "4096", "--large-size", "128"])
    cli.main(["--out", "o", "--report", "r"])
    from pathlib import Path

    assert calls == [
        (Path("runs/reference_family_seed1"), replace(FULL, seed=1, reference_sizes=(8, 16), variants=("vanilla", "mat_groups")),
         Path("docs/results/reference_family/seed1")),
        (Path("runs/reference_family_quick"), replace(QUICK, train_tokens=4096, large_size=128),
         Path("runs/reference_family_quick")),
        (Path("o"), FULL, Path("r")),
    ]
    with pytest.raises(SystemExit):
        cli.main(["--variants", "nope"])
    assert "invalid choice" in capsys.readouterr().err
