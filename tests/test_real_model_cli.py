"""benchmarks.real_model's command line, table and meta-structure bookkeeping (no MiniLM: the
training and the meta-SAE are replaced by stand-ins)."""

from __future__ import annotations

import json

import pytest
import torch

import benchmarks.real_model.__main__ as cli
from benchmarks.real_model.compare import add_meta_structure, format_table


def test_cli_passes_typed_settings_to_run(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "run", lambda *a, **kw: calls.append((a, kw)))
    assert cli.main(["--out", "o", "--tokens", "2048", "--variants", "btk_groups", "dl_batchtopk", "--log", "lr=3e-3",
                     "--log", "sparsity=l1", "--extra-log", '[{"lr": 1e-2}, {"lr": 3e-2}]', "--dtype", "bfloat16",
                     "--threads", "1"]) == 0
    (args, kw), = calls
    assert args == ("o", 2048, 65_536, 1024, 4096, 32, ("btk_groups", "dl_batchtopk"), {"lr": 3e-3, "sparsity": "l1"})
    assert kw == {"seed": 0, "extra_log": [{"lr": 1e-2}, {"lr": 3e-2}], "autocast_dtype": torch.bfloat16}


@pytest.mark.parametrize("argv, words", [(["--variants", "nope"], ["invalid choice"]),
                                         (["--log", "lr"], ["--log", "KEY=VALUE"]),
                                         (["--meta-structure-only"], ["--meta-structure-seeds"])])
def test_cli_errors(argv, words, capsys, monkeypatch):
    monkeypatch.setattr(cli, "run", lambda *a, **kw: pytest.fail("should not train"))
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    text = capsys.readouterr().err + str(e.value.code)
    assert all(w in text for w in words)


RESULTS = {"btk_groups": {"l0": 31.96, "dead_fraction": 0.0125, "fvu": 0.21234},
           "log_sparsity": {"l0": 40.04, "dead_fraction": 0.0, "fvu": 0.3}}


def test_format_table():
    assert format_table(RESULTS).splitlines() == [
        "| trainer | held-out L0 | dead latents | FVU |", "|---|---|---|---|",
        "| btk_groups | 32.0 | 1.2% | 0.212 |", "| log_sparsity | 40.0 | 0.0% | 0.300 |"]
    meta = {"btk_groups": {**RESULTS["btk_groups"], "meta_structure": {"variance_explained": 0.4213,
                                                                       "variance_explained_std": 0.0114}},
            "log_sparsity": {**RESULTS["log_sparsity"], "meta_structure": {"variance_explained": 0.5,
                                                                           "variance_explained_std": None}}}
    assert format_table(meta).splitlines()[2:] == ["| btk_groups | 32.0 | 1.2% | 0.212 | 0.421 ± 0.011 |",
                                                   "| log_sparsity | 40.0 | 0.0% | 0.300 | 0.500 |"]


def test_meta_structure_is_added_to_each_saved_sae(tmp_path, monkeypatch, capsys):
    import matryoshka_plugin
    import matryoshka_plugin.saebench.meta_structure as ms

    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    loaded = {f"trainer_{i}": torch.nn.Linear(2, 2 + i) for i in range(2)}
    monkeypatch.setattr(matryoshka_plugin, "load_dictionary", lambda folder: (loaded[folder.name], {}))
    seen = []

    def fake(sae, seeds, device, **config):
        seen.append((sae, seeds, device, config))
        return {"variance_explained": float(sae.out_features), "variance_explained_std": 0.0, "seconds": 1.0}

    monkeypatch.setattr(ms, "decoder_meta_structure", fake)
    add_meta_structure(tmp_path, [0, 1], autocast=False, train_steps=5)
    assert [s[0] for s in seen] == [loaded["trainer_0"], loaded["trainer_1"]]
    assert all(s[1:] == ([0, 1], "cpu", {"autocast": False, "train_steps": 5}) for s in seen)
    got = json.loads((tmp_path / "results.json").read_text())
    assert got["log_sparsity"]["meta_structure"] == {"variance_explained": 3.0, "variance_explained_std": 0.0,
                                                     "seconds": 1.0, "seeds": [0, 1],
                                                     "config": {"autocast": False, "train_steps": 5}}
    assert "| log_sparsity | 40.0 | 0.0% | 0.300 | 3.000 |" in capsys.readouterr().out
