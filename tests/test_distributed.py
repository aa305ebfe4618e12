"""torch.distributed on CPU (gloo, 2 processes started by torchrun): data-parallel training of one
SAE equals single-process training, trainer configs spread over ranks equal serial training, and
bad input fails fast instead of hanging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from matryoshka_plugin.distributed import assign_trainers

SCRIPT = Path(__file__).with_name("train_script.py")
ROOT = Path(__file__).resolve().parents[1]



def _torchrun(out: Path, *args: str, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(SCRIPT), str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _single(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(out), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def _saved(folder: Path, n: int) -> list[dict]:
    return [torch.load(folder / f"trainer_{i}" / "ae.pt") for i in range(n)]


@pytest.mark.slow
def test_data_parallel_equals_one_process_and_resumes_exactly(tmp_path):
    one = _single(tmp_path / "one", "--set", "dp", "--normalize")
    assert one.returncode == 0, one.stderr
    two = _torchrun(tmp_path / "two", "--set", "dp", "--normalize", "--distributed", "data")
    assert two.returncode == 0, two.stderr[-3000:]
    for i, (a, b) in enumerate(zip(_saved(tmp_path / "one", 10), _saved(tmp_path / "two", 10))):
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), (i, key, (a[key] - b[key]).abs().max())
    # killed on rank 0 (which reads the data) at step 14, then resumed by a new torchrun
    killed = _torchrun(tmp_path / "run", "--set", "dp", "--normalize", "--distributed", "data", "--kill-at", "116")
    assert killed.returncode != 0
    resumed = _torchrun(tmp_path / "run", "--set", "dp", "--normalize", "--distributed", "data", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for a, b in zip(_saved(tmp_path / "two", 10), _saved(tmp_path / "run", 10)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # a data-parallel run resumes only with the same world size
    other = _single(tmp_path / "run", "--set", "dp", "--normalize", "--distributed", "data", "--resume")
    assert other.returncode != 0
    assert "world size of the data-parallel run: checkpoint 2, now 1" in other.stderr


# The global RNG states, and BatchTopK's logged estimate of the threshold's L0 (taken on this rank's
# shard; training never reads it).
_RANK_LOCAL = {"rng", "threshold_l0"}


def _differences(a, b, where="") -> list[str]:
    """Paths where two nested states differ (tensors compared bit for bit; rank-local entries skipped)."""
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b) else [where]
    if isinstance(a, dict):
        if set(a) != set(b):
            return [where + " (keys)"]
        return [d for k in a if k not in _RANK_LOCAL for d in _differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [where + " (length)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


@pytest.mark.slow
def test_data_parallel_ranks_stay_identical_with_every_option(tmp_path):
    """save_steps with normalize_activations (the biases scaled for saving), checkpoints, a kill and a
    resume (with one rank's view of the checkpoints lagging): every rank ends with bit-identical
    weights, optimizer state and statistics."""
    args = ("--set", "dp", "--only", "0,5", "--normalize", "--distributed", "data", "--save-steps", "3,9,17",
            "--checkpoint-every", "5")
    killed = _torchrun(tmp_path / "run", *args, "--kill-at", "116")  # the norm factor reads 102 batches
    assert killed.returncode != 0
    # rank 1's listing of resume/ lacks the newest checkpoint: every rank must take rank 0's choice
    resumed = _torchrun(tmp_path / "run", *args, "--resume", "--dump-ranks", "--stale-listing-rank", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "run" / "trainer_1" / "checkpoints" / "ae_17.pt").is_file()
    rank0, rank1 = (torch.load(tmp_path / "run" / f"rank_{r}.pt", weights_only=False) for r in range(2))
    differences = _differences(rank0, rank1)
    assert not differences, "\n".join(differences)


def _gradient_errors(folder: Path, reference: list[list[torch.Tensor]]) -> list[float]:
    """Per recorded clip call (trainer x step): the largest relative error of any parameter's gradient."""
    got = torch.load(folder / "grads_0.pt")
    assert len(got) == len(reference)
    return [max(float((g - r).norm() / r.norm().clamp_min(1e-12)) for g, r in zip(gs, rs))
            for gs, rs in zip(got, reference)]


@pytest.mark.slow
def test_data_parallel_gradients_equal_the_full_batch_gradient(tmp_path):
    """The gradients each trainer clips (averaged over the ranks) equal one process's gradients on
    the whole batch, parameter by parameter, in scale too; Adam and clipping would hide a wrong
    averaging factor from a comparison of weights, so the check must catch a doubled average."""
    args = ("--set", "dp", "--steps", "4", "--grad-dump")
    one = _single(tmp_path / "one", *args)
    assert one.returncode == 0, one.stderr
    reference = torch.load(tmp_path / "one" / "grads_0.pt")
    assert len(reference) == 4 * 10
    two = _torchrun(tmp_path / "two", *args, "--distributed", "data")
    assert two.returncode == 0, two.stderr[-3000:]
    errors = _gradient_errors(tmp_path / "two", reference)
    assert max(errors) < 1e-5, errors
    doubled = _torchrun(tmp_path / "doubled", *args, "--distributed", "data", "--grad-factor", "2")
    assert doubled.returncode == 0, doubled.stderr[-3000:]
    assert min(_gradient_errors(tmp_path / "doubled", reference)) > 0.5


def test_the_log_sparsity_configs_resample_latents():
    """The data-parallel comparison covers resampling (drawn from the whole batch on every rank)."""
    from train_script import batches, trainer_configs

    resampled = 0
    for cfg in trainer_configs("dp", 24)[5:7]:
        cfg = dict(cfg)
        trainer = cfg.pop("trainer")(**cfg)
        for step, x in zip(range(24), batches(-1, 64)):
            trainer.update(step, x)
            resampled += trainer.resampled
    assert resampled > 0


@pytest.mark.slow
def test_data_parallel_with_the_new_options(tmp_path):
    """Per-level AuxK, detached levels, k annealing and reordering (its statistic summed over the
    ranks) train data-parallel as in one process."""
    one = _single(tmp_path / "one", "--set", "dp-options")
    assert one.returncode == 0, one.stderr
    two = _torchrun(tmp_path / "two", "--set", "dp-options", "--distributed", "data")
    assert two.returncode == 0, two.stderr[-3000:]
    for i, (a, b) in enumerate(zip(_saved(tmp_path / "one", 4), _saved(tmp_path / "two", 4))):
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), (i, key, (a[key] - b[key]).abs().max())


@pytest.mark.slow
def test_trainers_spread_over_ranks_equal_serial_training(tmp_path):
    """Also: rank 0's data has a config (ctx_len, io) and the other ranks get data=None; every
    trainer's config.json holds it, so a SAELens export of a rank 1 trainer has its context size."""
    from train_script import DATA_CONFIG

    from matryoshka_plugin.saelens.export import export_to_saelens

    serial = _single(tmp_path / "serial", "--set", "all", "--data-config")
    assert serial.returncode == 0, serial.stderr
    spread = _torchrun(tmp_path / "spread", "--set", "all", "--distributed", "trainers", "--warm-up-run",
                       "--data-config")
    assert spread.returncode == 0, spread.stderr[-3000:]
    for i, (a, b) in enumerate(zip(_saved(tmp_path / "serial", 11), _saved(tmp_path / "spread", 11))):
        assert all(torch.equal(a[k], b[k]) for k in a), f"trainer_{i}"
    for i in range(11):
        config = json.loads((tmp_path / "spread" / f"trainer_{i}" / "config.json").read_text())
        assert config.get("buffer") == DATA_CONFIG, f"trainer_{i}"
    on_rank_1 = assign_trainers([1] * 11, 2)[1][0]  # equal costs: trainers 1, 3, ... on rank 1
    out = export_to_saelens(tmp_path / "spread" / f"trainer_{on_rank_1}", tmp_path / "export", model_name="tiny",
                            hook_name="blocks.0.hook_resid_pre", verify=False)
    assert json.loads((out / "cfg.json").read_text())["metadata"]["context_size"] == DATA_CONFIG["ctx_len"]
    # every rank wrote its own trainers into the shared checkpoints
    newest = sorted((tmp_path / "spread" / "resume").glob("step_*"))[-1]
    assert sorted(p.name for p in newest.glob("trainer_*.pt")) == sorted(f"trainer_{i}.pt" for i in range(11))


@pytest.mark.slow
def test_more_processes_than_trainers_warns_naming_the_idle_ranks(tmp_path):
    run = _torchrun(tmp_path / "run", "--set", "dp", "--only", "0", "--distributed", "trainers", "--steps", "4")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "1 trainer config over 2 processes, so rank 1 trains nothing" in run.stderr


@pytest.mark.slow
def test_bad_input_fails_before_training(tmp_path):
    odd = _torchrun(tmp_path / "odd", "--set", "dp", "--distributed", "data", "--batch", "63")
    assert odd.returncode != 0
    assert "a batch of 63 activations does not divide over 2 processes" in odd.stderr
    assert not list((tmp_path / "odd").glob("trainer_*/ae.pt")) and not (tmp_path / "odd" / "resume").exists()
    upstream = _torchrun(tmp_path / "upstream", "--set", "all", "--distributed", "data")
    assert upstream.returncode != 0
    assert "BatchTopKTrainer cannot train one SAE over several processes" in upstream.stderr


@pytest.mark.slow
def test_a_dead_rank_makes_the_other_exit_with_an_error(tmp_path):
    """Plain processes (no torchrun agent to clean up): rank 1 exits at step 3, rank 0 must fail."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), WORLD_SIZE="2")
    procs = []
    for rank in range(2):
        e = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen(
            [sys.executable, str(SCRIPT), str(tmp_path / "run"), "--set", "dp", "--distributed", "data",
             "--die-rank", "1", "--die-at", "3", "--timeout", "30"],
            cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    t0 = time.time()
    _, err0 = procs[0].communicate(timeout=300)
    procs[1].communicate(timeout=60)
    assert procs[1].returncode == 3
    assert procs[0].returncode != 0, "rank 0 finished although rank 1 died"
    assert time.time() - t0 < 240
    assert "Error" in err0


def _plain_processes(out: Path, args: list[str], world: int = 2, ranks=None) -> list[subprocess.Popen]:
    """``world`` ranks started by hand (no torchrun agent to clean up after a failure)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world))
    return [subprocess.Popen([sys.executable, str(SCRIPT), str(out), *args], cwd=ROOT,
                             env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for r in (range(world) if ranks is None else ranks)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_rank_0s_long_preparation_outlasts_the_training_timeout(tmp_path):
    """With timeout_s=5, rank 0 spends 8 s on the norm factor (a slow batch), 8 s publishing each
    checkpoint and, resumed, 8 s skipping consumed batches: the waits around that one-off work are
    bounded by prepare_timeout_s, so the run finishes."""
    args = ("--set", "dp", "--only", "0,5", "--normalize", "--distributed", "data", "--steps", "12",
            "--checkpoint-every", "5", "--timeout", "5", "--slow-batch", "50", "--slow-seconds", "8",
            "--slow-publish", "8")
    killed = _torchrun(tmp_path / "run", *args, "--kill-at", "113")  # step 11, after the checkpoint of step 10
    assert killed.returncode != 0
    assert (tmp_path / "run" / "resume" / "step_000000010").is_dir(), killed.stderr[-3000:]
    resumed = _torchrun(tmp_path / "run", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "run" / "trainer_1" / "ae.pt").is_file()


@pytest.mark.slow
def test_a_hung_rank_makes_the_others_fail_within_the_timeout(tmp_path):
    """Rank 1 hangs (sleeps) in step 3 for far longer than timeout_s=5: rank 0 fails with an error
    naming the timeout within bounded time instead of waiting for it."""
    procs = _plain_processes(tmp_path / "run", ["--set", "dp", "--only", "0", "--distributed", "data",
                                                "--sleep-rank", "1", "--sleep-at", "3", "--sleep-seconds", "300",
                                                "--timeout", "5"])
    try:
        t0 = time.time()
        _, err0 = procs[0].communicate(timeout=200)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode != 0, "rank 0 finished although rank 1 hung"
    assert "rank 0: a training collective failed: another rank died, or hung longer than timeout_s=5 s" in err0
    assert elapsed < 120


@pytest.mark.slow
def test_a_missing_peer_fails_the_start_up_within_its_own_timeout(tmp_path):
    """Rank 0 of WORLD_SIZE=2 started alone waits startup_timeout_s, not timeout_s, and says why."""
    (rank0,) = _plain_processes(tmp_path / "run", ["--set", "dp", "--only", "0", "--distributed", "data",
                                                   "--startup-timeout", "3"], ranks=[0])
    t0 = time.time()
    try:
        _, err = rank0.communicate(timeout=120)
    finally:
        rank0.kill()
    assert rank0.returncode != 0
    assert "did not gather the 2 processes of WORLD_SIZE within startup_timeout_s=3 s" in err
    assert time.time() - t0 < 60


def test_one_process_with_a_distributed_mode_leaves_no_rendezvous_variables():
    code = (
        "import os, sys; sys.path.insert(0, 'tests'); from train_script import batches, trainer_configs; "
        "from matryoshka_plugin import train; "
        "train(batches(-1, 64), trainer_configs('dp', 4)[:1], 4, device='cpu', distributed='data', progress=False); "
        "print(sorted(k for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT') if k in os.environ))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_an_explicit_gpu_index_is_refused_where_every_rank_would_share_it(monkeypatch):
    from matryoshka_plugin.distributed import DistributedRun

    run = DistributedRun("data", rank=1, world_size=2, local_rank=1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert run.device("cuda") == "cuda:1"
    with pytest.raises(ValueError, match=r"device='cuda:0' in a run of 2 processes would put every rank on the same GPU"):
        run.device("cuda:0")
    assert run.device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU per process (CUDA_VISIBLE_DEVICES)
    assert run.device("cuda:0") == "cuda:0"
    assert DistributedRun(None).device("cuda:0") == "cuda:0"


@pytest.mark.parametrize("costs,world,expected", [
    ([1, 1, 1, 1], 2, [[0, 2], [1, 3]]),
    ([8, 1, 1, 1, 1, 1, 1, 1, 1], 2, [[0], [1, 2, 3, 4, 5, 6, 7, 8]]),
    ([4, 3, 2, 1], 3, [[0], [1], [2, 3]]),
])
def test_assign_trainers_balances_cost(costs, world, expected):
    assert assign_trainers(costs, world) == expected
