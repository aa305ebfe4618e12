"""load_dictionary: our folders, dictionary_learning's own folders, and every broken input."""

import json
import os
import shutil
import stat

import pytest
import torch
from helpers import low_rank_stream
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer
from dictionary_learning.training import trainSAE

from matryoshka_plugin import CheckpointError, MatryoshkaBatchTopKTrainer, MatryoshkaLogSparsityTrainer, load_dictionary
from matryoshka_plugin.checkpoints import register_dictionary_class
from matryoshka_plugin.io import atomic_torch_save
from matryoshka_plugin.registry import unregister_architecture


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


def test_registered_loader_is_used(tmp_path):
    calls = []

    def loader(path, cfg, device):
        calls.append((path, cfg["marker"], device))
        return torch.nn.Linear(3, 5)

    folder = tmp_path / "trainer_0"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "IdentitySAE", "marker": 7}}))
    try:
        register_dictionary_class("IdentitySAE", loader)
        register_dictionary_class("IdentitySAE", loader)  # twice is harmless
        with pytest.raises(ValueError, match="already registered"):
            register_dictionary_class("IdentitySAE", lambda p, c, d: None)
        ae, cfg = load_dictionary(folder, device="cpu")
        assert type(ae) is torch.nn.Linear and cfg["trainer"]["marker"] == 7
        assert calls == [(folder / "ae.pt", 7, "cpu")]
        load_dictionary(folder, checkpoint=12)
        assert calls[-1][0] == folder / "checkpoints" / "ae_12.pt"
    finally:
        unregister_architecture("IdentitySAE")  # leave the global registry as it was
    with pytest.raises(CheckpointError, match="unknown dict_class 'IdentitySAE'"):
        load_dictionary(folder)


@pytest.mark.parametrize("i", [0, 1, 2])
@pytest.mark.parametrize("key, value, actual", [("activation_dim", 32, 24), ("dict_size", 64, 48)])
def test_config_disagreeing_with_weights_is_rejected_at_load(runs, tmp_path, i, key, value, actual):
    folder = copy_run(runs, tmp_path, i)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["trainer"][key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"config.json says {key}={value} but the weights have {actual}"):
        load_dictionary(folder)


def test_latest_complete_checkpoint(runs, tmp_path):
    folder = copy_run(runs, tmp_path, 0)
    ckpts = folder / "checkpoints"
    ae3, _ = load_dictionary(folder, checkpoint=3)
    latest, _ = load_dictionary(folder, checkpoint="latest")  # only ae_3.pt so far
    assert torch.equal(latest.W_dec, ae3.W_dec)
    # a newer complete one wins (10 > 3 although "ae_10" < "ae_3" as text); other names are ignored
    shutil.copy(folder / "ae.pt", ckpts / "ae_10.pt")
    (ckpts / "ae_final.pt").write_bytes(b"junk")
    final, _ = load_dictionary(folder)
    latest, _ = load_dictionary(folder, checkpoint="latest")
    assert torch.equal(latest.W_dec, final.W_dec) and not torch.equal(final.W_dec, ae3.W_dec)
    # killed while writing step 10: skipped with a warning naming it, step 3 is loaded
    data = (ckpts / "ae_10.pt").read_bytes()
    (ckpts / "ae_10.pt").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=r"skipping .*ae_10\.pt: truncated"):
        latest, _ = load_dictionary(folder, checkpoint="latest")
    assert torch.equal(latest.W_dec, ae3.W_dec)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_dictionary(folder, checkpoint=10)  # an explicit step is never replaced by another
    data = (ckpts / "ae_3.pt").read_bytes()
    (ckpts / "ae_3.pt").write_bytes(data[:100])
    with pytest.warns(UserWarning) as caught, pytest.raises(
            CheckpointError, match=r"every checkpoint .* truncated or corrupt: \['ae_10.pt', 'ae_3.pt'\]"):
        load_dictionary(folder, checkpoint="latest")
    assert [str(w.message).split(":")[0] for w in caught] == [f"skipping {ckpts / 'ae_10.pt'}", f"skipping {ckpts / 'ae_3.pt'}"]
    assert all(w.filename == __file__ for w in caught)  # reported at the caller's line
    shutil.rmtree(ckpts)
    with pytest.raises(CheckpointError, match="no checkpoints"):
        load_dictionary(folder, checkpoint="latest")
    with pytest.raises(CheckpointError, match="'newest'"):
        load_dictionary(folder, checkpoint="newest")


def test_latest_checkpoint_is_only_for_this_packages_classes(runs):
    with pytest.raises(CheckpointError, match="only supported for this package"):
        load_dictionary(runs / "trainer_2", checkpoint="latest")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_save_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_torch_save({"a": torch.ones(3)}, tmp_path / "ae.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ae.pt").stat().st_mode) == mode


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


# ----------------------------------------------------------------------------------------------
# Folders of another kind, and hostile files
# ----------------------------------------------------------------------------------------------


def test_a_run_folder_names_its_trainer_folders(runs):
    with pytest.raises(CheckpointError, match=r"training run's folder.*trainer_0, trainer_1, trainer_2; pass one of them"):
        load_dictionary(runs)


def test_a_saelens_folder_points_to_import_from_saelens(runs, tmp_path):
    from matryoshka_plugin import export_to_saelens, import_from_saelens

    out = tmp_path / "saelens"
    export_to_saelens(runs / "trainer_1", out, model_name="toy", hook_name="blocks.0.hook_resid_post")
    with pytest.raises(CheckpointError, match=r"SAELens SAE folder.*import_from_saelens"):
        load_dictionary(out)
    # and the other way round: import_from_saelens on trainSAE folders
    with pytest.raises(CheckpointError, match=r"trainSAE folder.*load_dictionary"):
        import_from_saelens(runs / "trainer_0")
    with pytest.raises(CheckpointError, match=r"training run's folder.*trainer_0"):
        import_from_saelens(runs)


class _Payload:
    """Unpickling this creates ``marker``: a hostile ``ae.pt``, harmlessly."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("i", [0, 1, 2])
def test_a_hostile_weights_file_is_refused_as_unsafe(runs, tmp_path, i):
    from matryoshka_plugin.io import UnsafeCheckpointError

    folder = copy_run(runs, tmp_path, i)
    marker = tmp_path / "executed"
    state = torch.load(folder / "ae.pt", weights_only=True)
    torch.save({**state, "payload": _Payload(marker)}, folder / "ae.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"ae.pt was refused as unsafe.*io.open") as e:
        load_dictionary(folder)
    assert "truncated" not in str(e.value) and not marker.exists()


def test_a_hostile_checkpoint_is_refused_not_skipped(runs, tmp_path):
    from matryoshka_plugin.io import UnsafeCheckpointError

    folder = copy_run(runs, tmp_path, 0)
    marker = tmp_path / "executed"
    (folder / "checkpoints" / "ae_5.pt").write_bytes((folder / "ae.pt").read_bytes())
    # the old file format (no zip archive), which the completeness check reads in full
    torch.save({"payload": _Payload(marker)}, folder / "checkpoints" / "ae_5.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match=r"ae_5.pt was refused as unsafe"):
        load_dictionary(folder, checkpoint="latest")
    assert not marker.exists()
