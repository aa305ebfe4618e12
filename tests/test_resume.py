"""Exact resume: trainer state round trips, run checkpoints, and runs killed with SIGKILL."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from matryoshka_plugin import CheckpointError, MatryoshkaBatchTopKTrainer, MatryoshkaLogSparsityTrainer, train
from matryoshka_plugin.resume import RunCheckpoints, load_trainer_state, trainer_state_dict

SCRIPT = Path(__file__).with_name("train_script.py")
ROOT = Path(__file__).resolve().parents[1]


def _batch(i: int, b: int = 64, d: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(b, d, generator=g) * 2 + 0.5


def _stream(start: int = 0):
    i = start
    while True:
        yield _batch(i)
        i += 1


def _settings(cls, mode: str) -> dict:
    common = dict(steps=16, activation_dim=16, dict_size=32, seed=3, device="cpu", warmup_steps=2, prefix_mode=mode,
                  n_prefixes=4, group_fractions=[0.25, 0.75] if mode == "groups" else None, dead_feature_threshold=128)
    if cls is MatryoshkaBatchTopKTrainer:
        return dict(common, k=4, threshold_start_step=3)
    return dict(common, target_l0=4)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train(trainer, steps: range):
    for s in steps:
        trainer.update(s, _batch(s))
    return trainer


def _round_trip(make, split: int, steps: int = 16, rng_seed: int = 1234):
    """An uninterrupted run of ``steps`` steps, the state saved after ``split`` steps, and a fresh
    trainer resumed from that state and trained to the end (built under another global RNG state,
    so it must not depend on the new process's RNG)."""
    full = _train(make(), range(steps))
    state = trainer_state_dict(_train(make(), range(split)))
    torch.manual_seed(rng_seed)
    resumed = make()
    load_trainer_state(resumed, state)
    return full, state, _train(resumed, range(split, steps))


TRAINERS = [(cls, mode) for cls in (MatryoshkaBatchTopKTrainer, MatryoshkaLogSparsityTrainer)
            for mode in ("groups", "every", "pareto", "pareto_expected", "none")]


# MatryoshkaBatchTopKTrainer's options, each with the per-latent state it adds.
OPTIONS = [dict(matryoshka_aux_loss=True), dict(detach_inner_levels=True), dict(reorder_by="frequency"),
           dict(reorder_by="contribution", reorder_decay=0.9), dict(k_anneal_steps=10),
           dict(matryoshka_aux_loss=True, detach_inner_levels=True, reorder_by="frequency", k_anneal_steps=10)]
CASES = [(cls, mode, {}) for cls, mode in TRAINERS] + [(MatryoshkaBatchTopKTrainer, "groups", o) for o in OPTIONS]


@pytest.mark.parametrize("cls,mode,options", CASES,
                         ids=[f"{c.__name__[10:14]}-{m}" + "".join(f"-{k}" for k in o) for c, m, o in CASES])
def test_state_dict_round_trip_continues_exactly(cls, mode, options):
    settings = dict(_settings(cls, mode), **options)
    full, state, resumed = _round_trip(lambda: cls(**settings), split=7)
    assert _equal(full.ae.state_dict(), resumed.ae.state_dict())

    # What a by-hand resume (the SAE's weights only) loses: it does not end at the same weights.
    naive = cls(**settings)
    naive.ae.load_state_dict(state["ae"])
    _train(naive, range(7, 16))
    assert not _equal(full.ae.state_dict(), naive.ae.state_dict())


def _upstream(name: str) -> tuple[type, dict]:
    common = dict(steps=16, activation_dim=16, dict_size=32, layer=0, lm_name="x", device="cpu", warmup_steps=2,
                  seed=5)
    if name == "batch_top_k":
        from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer

        return BatchTopKTrainer, dict(common, k=4, dict_class=BatchTopKSAE, threshold_start_step=3)
    if name == "matryoshka":
        from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer as Upstream

        return Upstream, dict(common, k=4, group_fractions=[0.25, 0.75], threshold_start_step=3)
    from dictionary_learning.trainers.standard import StandardTrainer

    return StandardTrainer, dict(common, l1_penalty=0.05, sparsity_warmup_steps=4, resample_steps=5)


@pytest.mark.parametrize("name", ["batch_top_k", "matryoshka", "standard"])
def test_upstream_trainer_state_round_trip(name):
    """dictionary_learning's trainers (the Gemma benchmark's baselines) resume exactly too."""
    cls, kw = _upstream(name)
    full, state, resumed = _round_trip(lambda: cls(**kw), split=6, rng_seed=77)
    assert "optimizer" in state and "scheduler" in state
    assert _equal(full.ae.state_dict(), resumed.ae.state_dict())


def test_loading_a_different_configuration_names_the_differences():
    a = MatryoshkaBatchTopKTrainer(**_settings(MatryoshkaBatchTopKTrainer, "groups"))
    a.update(0, _batch(0))
    state = a.state_dict()
    other = MatryoshkaBatchTopKTrainer(**dict(_settings(MatryoshkaBatchTopKTrainer, "groups"), k=8, dict_size=64))
    with pytest.raises(CheckpointError, match=r"dict_size: checkpoint 32, now 64.*k: checkpoint 4, now 8"):
        other.load_state_dict(state)
    log = MatryoshkaLogSparsityTrainer(**_settings(MatryoshkaLogSparsityTrainer, "groups"))
    with pytest.raises(CheckpointError, match="MatryoshkaBatchTopKTrainer state.*MatryoshkaLogSparsityTrainer"):
        log.load_state_dict(state)
    # a checkpoint from before a setting existed resumes as that setting's default
    old = dict(state, config={k: v for k, v in state["config"].items() if k != "k_anneal_steps"})
    MatryoshkaBatchTopKTrainer(**_settings(MatryoshkaBatchTopKTrainer, "groups")).load_state_dict(old)
    # the device may change between runs
    moved = MatryoshkaBatchTopKTrainer(**dict(_settings(MatryoshkaBatchTopKTrainer, "groups"), device="cpu:0"))
    moved.load_state_dict(state)


def _configs(steps: int) -> list[dict]:
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer

    out = []
    for cls, mode in (TRAINERS[0], TRAINERS[2], TRAINERS[7]):
        out.append(dict(trainer=cls, **dict(_settings(cls, mode), steps=steps), layer=0, lm_name="x"))
    out.append(dict(trainer=BatchTopKTrainer, dict_class=BatchTopKSAE, steps=steps, activation_dim=16, dict_size=32,
                    k=4, layer=0, lm_name="x", device="cpu", warmup_steps=2, threshold_start_step=3, seed=5))
    return out


def _saved(folder: Path, n: int) -> list[dict]:
    return [torch.load(folder / f"trainer_{i}" / "ae.pt") for i in range(n)]


@pytest.mark.parametrize("normalize", [False, True])
def test_train_equals_trainsae(tmp_path, normalize):
    from dictionary_learning.training import trainSAE

    train(_stream(), _configs(12), 12, save_dir=str(tmp_path / "ours"), device="cpu", progress=False,
          normalize_activations=normalize, save_steps=[5])
    trainSAE(_stream(), _configs(12), 12, save_dir=str(tmp_path / "upstream"), device="cpu",
             normalize_activations=normalize, save_steps=[5])
    final = tmp_path / "upstream"
    if normalize:
        # trainSAE scales the live biases by the norm factor to save and back by its inverse, which
        # moves them by an ulp; train saves a scaled copy, so its weights are those of a run
        # without intermediate saves.
        trainSAE(_stream(), _configs(12), 12, save_dir=str(tmp_path / "upstream_no_saves"), device="cpu",
                 normalize_activations=normalize)
        final = tmp_path / "upstream_no_saves"
    for a, b in zip(_saved(tmp_path / "ours", 4), _saved(final, 4)):
        assert _equal(a, b)
    for i in range(4):
        name = f"trainer_{i}/checkpoints/ae_5.pt"
        assert _equal(torch.load(tmp_path / "ours" / name), torch.load(tmp_path / "upstream" / name))


class _Interrupt(Exception):
    pass


def _stream_until(stop: int):
    for i, x in enumerate(_stream()):
        if i == stop:
            raise _Interrupt
        yield x


def test_resume_in_process_keeps_newest_checkpoints_and_finishes_exactly(tmp_path):
    train(_stream(), _configs(20), 20, save_dir=str(tmp_path / "full"), device="cpu", progress=False)
    run = tmp_path / "run"
    with pytest.raises(_Interrupt):
        train(_stream_until(13), _configs(20), 20, save_dir=str(run), device="cpu", progress=False,
              checkpoint_every=3, keep_checkpoints=2)
    assert [p.name for p in RunCheckpoints(run / "resume").complete()] == ["step_000000012", "step_000000009"]
    assert not (run / "trainer_0" / "ae.pt").exists()
    train(_stream(), _configs(20), 20, save_dir=str(run), device="cpu", progress=False, checkpoint_every=3,
          resume=True)
    for a, b in zip(_saved(tmp_path / "full", 4), _saved(run, 4)):
        assert _equal(a, b)
    # resuming a finished run changes nothing
    before = _saved(run, 4)
    train(_stream_until(0), _configs(20), 20, save_dir=str(run), device="cpu", progress=False, checkpoint_every=3,
          resume=True)
    for a, b in zip(before, _saved(run, 4)):
        assert _equal(a, b)


def test_resume_refuses_a_different_run(tmp_path):
    with pytest.raises(_Interrupt):
        train(_stream_until(7), _configs(20), 20, save_dir=str(tmp_path), device="cpu", progress=False,
              checkpoint_every=3)
    with pytest.raises(CheckpointError, match="steps: checkpoint 20, now 30"):
        train(_stream(), _configs(30), 30, save_dir=str(tmp_path), device="cpu", progress=False, resume=True)
    changed = _configs(20)
    changed[1]["k"] = 6
    with pytest.raises(CheckpointError, match=r"trainer_configs\[1\].*k: checkpoint 4, now 6"):
        train(_stream(), changed, 20, save_dir=str(tmp_path), device="cpu", progress=False, resume=True)
    with pytest.raises(CheckpointError, match="4 trainers in the checkpoint, 3 now"):
        train(_stream(), _configs(20)[:3], 20, save_dir=str(tmp_path), device="cpu", progress=False, resume=True)
    with pytest.raises(ValueError, match="need a save_dir"):
        train(_stream(), _configs(20), 20, device="cpu", checkpoint_every=3)


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path):
    train(_stream(), _configs(20), 20, save_dir=str(tmp_path / "full"), device="cpu", progress=False)
    run = tmp_path / "run"
    with pytest.raises(_Interrupt):
        train(_stream_until(14), _configs(20), 20, save_dir=str(run), device="cpu", progress=False,
              checkpoint_every=4, keep_checkpoints=3)
    newest = RunCheckpoints(run / "resume").complete()[0]
    f = newest / "trainer_2.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"skipping the unusable checkpoint .*step_000000012.*trainer_2.pt"):
        train(_stream(), _configs(20), 20, save_dir=str(run), device="cpu", progress=False, checkpoint_every=4,
              resume=True)
    for a, b in zip(_saved(tmp_path / "full", 4), _saved(run, 4)):
        assert _equal(a, b)


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(out), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("normalize", [False, True])
def test_sigkill_at_a_random_step_then_resume_is_bit_exact(tmp_path, normalize):
    """Both trainers in every prefix mode and dictionary_learning's BatchTopK, one run each."""
    flags = ["--normalize"] if normalize else []
    first = 102 if normalize else 0  # batches the norm factor reads before training
    kill = first + random.Random(7 + normalize).randrange(6, 23)
    full = _run(tmp_path / "full", *flags)
    assert full.returncode == 0, full.stderr
    killed = _run(tmp_path / "run", *flags, "--kill-at", str(kill))
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    assert not (tmp_path / "run" / "trainer_0" / "ae.pt").exists()
    resumed = _run(tmp_path / "run", *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    for i, (a, b) in enumerate(zip(_saved(tmp_path / "full", 11), _saved(tmp_path / "run", 11))):
        assert _equal(a, b), f"trainer_{i} differs after resuming from the kill at batch {kill}"


def _state_after_one_step(cls, settings: dict) -> dict:
    t = cls(**settings)
    t.update(0, _batch(0))
    return t.state_dict()


def test_a_setting_set_in_the_checkpoint_and_none_now_is_refused():
    """None is a real choice for these settings (no balance, equal weights, no decay...): a resumed
    run that passes None where the checkpoint had a value would train another run."""
    base = _settings(MatryoshkaBatchTopKTrainer, "groups")
    state = _state_after_one_step(MatryoshkaBatchTopKTrainer,
                                  dict(base, balance_beta=0.25, group_weights=[0.7, 0.3], decay_start=10))
    resumed = MatryoshkaBatchTopKTrainer(**dict(base, balance_beta=None, group_weights=None, decay_start=None))
    with pytest.raises(CheckpointError) as e:
        resumed.load_state_dict(state)
    for key in ("balance_beta: checkpoint 0.25, now None", "decay_start: checkpoint 10, now None",
                "group_weights: checkpoint [0.7, 0.3], now None"):
        assert key in str(e.value)
    assert resumed.cfg.balance_beta is None and resumed.cfg.decay_start is None  # not taken from the checkpoint

    for options in (dict(reorder_by="frequency"), dict(k_anneal_steps=10)):
        state = _state_after_one_step(MatryoshkaBatchTopKTrainer, dict(base, **options))
        key = next(iter(options))
        with pytest.raises(CheckpointError, match=rf"{key}: checkpoint .*, now None"):
            MatryoshkaBatchTopKTrainer(**dict(base, **{key: None})).load_state_dict(state)

    log = _settings(MatryoshkaLogSparsityTrainer, "groups")
    state = _state_after_one_step(MatryoshkaLogSparsityTrainer, log)
    with pytest.raises(CheckpointError, match=r"target_l0: checkpoint 4.0, now None"):
        MatryoshkaLogSparsityTrainer(**dict(log, target_l0=None)).load_state_dict(state)


def test_an_automatically_resolved_setting_resumes_as_resolved():
    """The log-sparsity trainer sets dead_feature_threshold=None at the first step: a fresh trainer
    says None, the checkpoint the resolved value, and that is the same run."""
    settings = dict(_settings(MatryoshkaLogSparsityTrainer, "groups"), dead_feature_threshold=None)
    full, state, resumed = _round_trip(lambda: MatryoshkaLogSparsityTrainer(**settings), split=7)
    assert state["config"]["dead_feature_threshold"] is not None
    assert resumed.cfg.dead_feature_threshold == state["config"]["dead_feature_threshold"]
    assert _equal(full.ae.state_dict(), resumed.ae.state_dict())


def test_train_refuses_a_resume_whose_settings_are_none_where_the_checkpoint_had_values(tmp_path):
    configs = _configs(20)[:1]
    configs[0].update(balance_beta=0.25, decay_start=10)
    with pytest.raises(_Interrupt):
        train(_stream_until(7), configs, 20, save_dir=str(tmp_path), device="cpu", progress=False,
              checkpoint_every=3)
    configs[0].update(balance_beta=None, decay_start=None)
    with pytest.raises(CheckpointError, match=r"trainer_configs\[0\].*balance_beta: checkpoint 0.25, now None"):
        train(_stream(), configs, 20, save_dir=str(tmp_path), device="cpu", progress=False, resume=True)


class _Payload:
    """Unpickling this creates ``marker``: what a hostile ``run.pt`` would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _interrupted_run(folder: Path) -> Path:
    """A run stopped after its checkpoints at steps 3 and 6; returns the newest checkpoint folder."""
    with pytest.raises(_Interrupt):
        train(_stream_until(7), _configs(20)[:2], 20, save_dir=str(folder), device="cpu", progress=False,
              checkpoint_every=3)
    return RunCheckpoints(folder / "resume").complete()[0]


def _plant(path: Path, obj) -> None:
    """Replace ``path`` with ``obj`` and fix the manifest, as someone who can write the folder can."""
    import json

    torch.save(obj, path)
    manifest = path.parent / "manifest.json"
    sizes = json.loads(manifest.read_text())
    sizes[path.name] = path.stat().st_size
    manifest.write_text(json.dumps(sizes))


@pytest.mark.parametrize("target", ["run.pt", "trainer_1.pt"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_never_run(tmp_path, target):
    from matryoshka_plugin.io import UnsafeCheckpointError

    newest = _interrupted_run(tmp_path / "run")
    marker = tmp_path / "executed"
    genuine = torch.load(newest / target, weights_only=True)
    _plant(newest / target, {**genuine, "payload": _Payload(marker)})
    with pytest.raises(UnsafeCheckpointError, match=rf"{target} was refused as unsafe.*io.open"):
        train(_stream(), _configs(20)[:2], 20, save_dir=str(tmp_path / "run"), device="cpu", progress=False,
              checkpoint_every=3, resume=True)
    assert not marker.exists()
    assert not (tmp_path / "run" / "trainer_0" / "ae.pt").exists()  # no training happened


def test_a_checkpoint_of_the_old_format_is_refused_as_unsafe(tmp_path):
    """Format 1 pickled numpy's RNG state (numpy arrays need unpickling code): refused, with a hint."""
    import numpy as np

    from matryoshka_plugin.io import UnsafeCheckpointError

    newest = _interrupted_run(tmp_path)
    run = torch.load(newest / "run.pt", weights_only=True)
    run["rng"] = [dict(r, numpy=np.random.get_state()) for r in run["rng"]]
    _plant(newest / "run.pt", dict(run, format=1))
    with pytest.raises(UnsafeCheckpointError, match=r"run.pt was refused as unsafe.*numpy.*new save_dir"):
        train(_stream(), _configs(20)[:2], 20, save_dir=str(tmp_path), device="cpu", progress=False, resume=True)


def test_the_size_check_covers_run_pt(tmp_path):
    """A run.pt that is not the one written (here: another size) makes the checkpoint unusable."""
    newest = _interrupted_run(tmp_path)
    run = torch.load(newest / "run.pt", weights_only=True)
    torch.save(dict(run, batches=run["batches"] + 1, padding=torch.zeros(10)), newest / "run.pt")
    with pytest.warns(UserWarning, match=r"skipping the unusable checkpoint .*step_000000006.*run.pt.*wrong size"):
        found = RunCheckpoints(tmp_path / "resume").load_latest([0, 1])
    assert found.step == 3


def test_checkpoint_files_load_with_weights_only(tmp_path):
    """Both trainers and dictionary_learning's BatchTopK: every file is tensors and plain containers."""
    with pytest.raises(_Interrupt):
        train(_stream_until(4), _configs(20), 20, save_dir=str(tmp_path), device="cpu", progress=False,
              checkpoint_every=3)
    newest = RunCheckpoints(tmp_path / "resume").complete()[0]
    assert sorted(f.name for f in newest.glob("*.pt")) == ["run.pt"] + [f"trainer_{i}.pt" for i in range(4)]
    for f in sorted(newest.glob("*.pt")):
        torch.load(f, weights_only=True)  # raises if anything else is pickled
