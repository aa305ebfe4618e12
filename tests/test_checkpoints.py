"""load_dictionary: our folders, dictionary_learning's own folders, and every broken input."""

import json
import shutil

import pytest
import torch
from conftest import low_rank_stream
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer
from dictionary_learning.training import trainSAE

from matryoshka_plugin import CheckpointError, MatryoshkaBatchTopKTrainer, MatryoshkaLogSparsityTrainer, load_dictionary
from matryoshka_plugin.checkpoints import atomic_torch_save, register_dictionary_class


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    common = dict(steps=6, activation_dim=24, dict_size=48, layer=0, lm_name="toy", device="cpu", warmup_steps=1)
    trainSAE(
        data=low_rank_stream(),
        trainer_configs=[
            dict(trainer=MatryoshkaBatchTopKTrainer, k=4, group_fractions=[0.25, 0.75], **common),
            dict(trainer=MatryoshkaLogSparsityTrainer, target_l0=4, **common),
            dict(trainer=BatchTopKTrainer, k=4, **common),
        ],
        steps=6,
        save_dir=str(root),
        save_steps=[3],
        device="cpu",
    )
    return root


def copy_run(runs, tmp_path, i):
    dst = tmp_path / f"trainer_{i}"
    shutil.copytree(runs / f"trainer_{i}", dst)
    return dst


def test_defers_to_dictionary_learning_for_its_own_classes(runs):
    ae, cfg = load_dictionary(runs / "trainer_2")
    assert isinstance(ae, BatchTopKSAE) and cfg["trainer"]["dict_class"] == "BatchTopKSAE"


def test_loads_intermediate_checkpoints(runs):
    ae3, _ = load_dictionary(runs / "trainer_0", checkpoint=3)
    ae, _ = load_dictionary(runs / "trainer_0")
    assert not torch.equal(ae3.W_dec, ae.W_dec)
    with pytest.raises(CheckpointError, match="missing weights file.*ae_4.pt"):
        load_dictionary(runs / "trainer_0", checkpoint=4)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_missing_files(runs, tmp_path, i):
    folder = copy_run(runs, tmp_path, i)
    (folder / "ae.pt").unlink()
    with pytest.raises(CheckpointError, match="missing weights file"):
        load_dictionary(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config file"):
        load_dictionary(folder)
    with pytest.raises(CheckpointError, match="no such SAE folder"):
        load_dictionary(tmp_path / "nowhere")


@pytest.mark.parametrize("i", [0, 1, 2])
def test_corrupt_files(runs, tmp_path, i):
    folder = copy_run(runs, tmp_path, i)
    data = (folder / "ae.pt").read_bytes()
    (folder / "ae.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_dictionary(folder)
    (folder / "config.json").write_text('{"trainer": {"dict_class": ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_dictionary(folder)
    (folder / "config.json").write_text('{"buffer": {}}')
    with pytest.raises(CheckpointError, match="no 'trainer' section"):
        load_dictionary(folder)


def test_unknown_dict_class_and_shape_mismatch(runs, tmp_path):
    folder = copy_run(runs, tmp_path, 0)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["trainer"]["dict_class"] = "HyperbolicSAE"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown dict_class 'HyperbolicSAE'"):
        load_dictionary(folder)
    folder = copy_run(runs, tmp_path / "b", 0)
    state = torch.load(folder / "ae.pt")
    state["b_dec"] = torch.zeros(7)
    torch.save(state, folder / "ae.pt")
    with pytest.raises(CheckpointError, match="does not hold a valid"):
        load_dictionary(folder)


def test_registry():
    def loader(path, cfg, device):
        return torch.nn.Identity()

    register_dictionary_class("IdentitySAE", loader)
    register_dictionary_class("IdentitySAE", loader)  # twice is harmless
    with pytest.raises(ValueError, match="already registered"):
        register_dictionary_class("IdentitySAE", lambda p, c, d: None)


def test_atomic_save_keeps_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "ae.pt"
    atomic_torch_save({"a": torch.ones(3)}, path)

    def boom(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ae.pt"]
