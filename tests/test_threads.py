"""Thread counts by work size: toy steps run on one thread, large steps keep every thread."""

from __future__ import annotations

import pytest
import torch

from matryoshka_plugin import MatryoshkaBatchTopKTrainer, MatryoshkaLogSparsityTrainer
from matryoshka_plugin.threads import STEP_PARALLEL_MIN_WORK, cpu_threads, threads_for


def make(kind: str, d: int, f: int):
    if kind == "btk":
        return MatryoshkaBatchTopKTrainer(steps=10, activation_dim=d, dict_size=f, k=2,
                                          group_fractions=[0.5, 0.5], warmup_steps=0, seed=0, device="cpu")
    return MatryoshkaLogSparsityTrainer(steps=10, activation_dim=d, dict_size=f, target_l0=2,
                                        warmup_steps=0, seed=0, device="cpu")


def threads_seen_by_optimizer(tr) -> list[int]:
    """Record torch's thread count each time the trainer's optimizer steps."""
    seen: list[int] = []
    step = tr.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return step(*args, **kwargs)

    tr.optimizer.step = recording_step
    return seen


def test_threads_for_threshold():
    assert threads_for(STEP_PARALLEL_MIN_WORK - 1, max_threads=8) == 1
    assert threads_for(STEP_PARALLEL_MIN_WORK, max_threads=8) == 8
    assert threads_for(0, max_threads=1) == 1


def test_cpu_threads_restores_count_even_on_error():
    with cpu_threads(2):
        with pytest.raises(RuntimeError):
            with cpu_threads(1):
                assert torch.get_num_threads() == 1
                raise RuntimeError("boom")
        assert torch.get_num_threads() == 2


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\(\)`")
@pytest.mark.parametrize("kind", ["btk", "ls"])
def test_toy_steps_use_one_thread_and_large_steps_keep_all(kind):
    with cpu_threads(2):
        small = make(kind, d=20, f=20)
        seen = threads_seen_by_optimizer(small)
        small.update(0, torch.randn(200, 20))
        assert seen == [1]  # 200 x 20 x 20 multiply-adds: one thread
        assert torch.get_num_threads() == 2  # restored for the caller (data pipeline, other trainers)

        d = f = 256
        rows = STEP_PARALLEL_MIN_WORK // (d * f)  # exactly at the threshold
        large = make(kind, d=d, f=f)
        seen = threads_seen_by_optimizer(large)
        large.update(0, torch.randn(rows, d))
        assert seen == [2]
        assert torch.get_num_threads() == 2


def test_demo_trains_toy_shapes_on_one_thread(tmp_path, monkeypatch):
    from matryoshka_plugin import demo

    seen: list[int] = []
    real_train = demo.trainSAE

    def recording_train(**kwargs):
        seen.append(torch.get_num_threads())
        return real_train(**kwargs)

    monkeypatch.setattr(demo, "trainSAE", recording_train)
    with cpu_threads(2):
        demo.run_demo(demo.DemoConfig(out_dir=str(tmp_path / "demo"), steps=150, eval_samples=500,
                                      saes=["vanilla"]))
        assert torch.get_num_threads() == 2
    assert seen == [1]
