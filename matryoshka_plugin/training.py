"""``train``: dictionary_learning's ``trainSAE`` that can resume and use several processes.

``train`` takes ``trainSAE``'s arguments and writes the same folders (``trainer_<i>/config.json``,
``checkpoints/ae_<step>.pt``, ``ae.pt``), so a pipeline swaps one import. On top of that:

* ``checkpoint_every=N`` writes the full state of every trainer (weights, optimizer, schedule,
  counters, RNG states), the data position and the norm factor every ``N`` steps under
  ``<save_dir>/resume/``, atomically, keeping the newest ``keep_checkpoints``;
* ``resume=True`` continues from the newest complete checkpoint (falling back past a corrupt
  one); a run interrupted at any point and resumed ends with the weights of an uninterrupted run
  (bit for bit on the CPU with deterministic data);
* ``distributed="trainers"`` or ``"data"`` uses the processes ``torchrun`` started
  (see :mod:`matryoshka_plugin.distributed`).

Data position on resume: a source with ``state_dict()``/``load_state_dict()`` (such as
:class:`~matryoshka_plugin.activation_source.ActivationSource`) is restored directly; any other
iterable is re-created by the caller from its start and the batches already consumed are drawn
and dropped (the cost of producing them once more, without training on them).
"""

from __future__ import annotations

import copy
import os
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from .distributed import (
    DEFAULT_PREPARE_TIMEOUT_S,
    DEFAULT_STARTUP_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    DistributedRun,
    ProcessGroupCollective,
    assign_trainers,
    setup,
)
from .errors import CheckpointError
from .io import atomic_torch_save, atomic_write_json, check_out_dir
from .resume import (
    RunCheckpoints,
    load_trainer_state,
    rng_state,
    set_rng_state,
    to_cpu,
    trainer_state_dict,
)

__all__ = ["train", "NORM_FACTOR_BATCHES"]

# trainSAE's get_norm_factor(data, steps=100) reads batches 0..101 before it stops.
NORM_FACTOR_BATCHES = 100


class _Counted(Iterator):
    """An iterator that counts what it hands out (the data position of a plain iterable)."""

    def __init__(self, it: Iterator):
        self.it, self.count = it, 0

    def __iter__(self) -> "_Counted":
        return self

    def __next__(self) -> Any:
        item = next(self.it)
        self.count += 1
        return item


def _is_iterator(data: Any) -> bool:
    try:
        return iter(data) is data
    except TypeError:
        return False


def _is_run_entry(name: str) -> bool:
    """What a run writes at the top of its save_dir (trainSAE's and ours)."""
    return name in ("resume", "config.json", "ae.pt", "checkpoints") or (
        name.startswith("trainer_") and name[8:].isdigit())


def _check_new_run_dir(ctx: DistributedRun, save_dir: str) -> None:
    """Refuse a new run in a save_dir holding another run's files, before anything is written: the
    old run's checkpoints (newer steps) would prune the new ones, its extra trainer folders would
    stay beside the new ones, and neither run could be resumed."""
    try:
        check_out_dir(Path(save_dir), overwrite=False, counts=_is_run_entry,
                      remedy="these are another run's files. Pass resume=True to continue that run, or choose "
                      "another save_dir (or move them away) for a new one")
        problem = None
    except FileExistsError as e:
        problem = e
    if not ctx.all_true(problem is None):  # every rank raises, none starts writing
        raise problem or FileExistsError(f"{save_dir} holds another run's files (seen by another process)")


def _trainer_cost(cfg: dict[str, Any]) -> float:
    # Step time grows with the SAE's parameters; enough to balance ranks.
    return float(cfg.get("dict_size", 1)) * float(cfg.get("activation_dim", 1))


def _save_weights(trainer: Any, path: str, norm_factor: float | None = None) -> None:
    """The SAE's state dict on the CPU, as trainSAE saves ``ae.pt`` and ``checkpoints/ae_<step>.pt``;
    with ``norm_factor``, a CPU copy's biases are scaled by it (the live SAE is left untouched:
    scaling by ``nf`` and back by ``1 / nf`` is not the identity in floating point, so a rank that
    saved would drift from the others)."""
    if norm_factor is None:
        atomic_torch_save(to_cpu(trainer.ae.state_dict()), path)
        return
    ae = trainer.ae
    # deepcopy with the tensors already copied to the CPU: no second copy on the device
    memo: dict[int, Any] = {}
    for t in list(ae.parameters()) + list(ae.buffers()):
        cpu = t.detach().to("cpu", copy=True)
        memo[id(t)] = torch.nn.Parameter(cpu, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else cpu
    scaled = copy.deepcopy(ae, memo)
    scaled.scale_biases(norm_factor)
    atomic_torch_save(scaled.state_dict(), path)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu().tolist()
    return getattr(value, "__name__", str(value))


def train(
    data: Iterable[torch.Tensor] | None,
    trainer_configs: list[dict],
    steps: int,
    use_wandb: bool = False,
    wandb_entity: str = "",
    wandb_project: str = "",
    save_steps: list[int] | None = None,
    save_dir: str | None = None,
    log_steps: int | None = None,
    activations_split_by_head: bool = False,
    transcoder: bool = False,
    run_cfg: dict | None = None,
    normalize_activations: bool = False,
    verbose: bool = False,
    device: str = "cuda",
    autocast_dtype: torch.dtype = torch.float32,
    *,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 2,
    resume: bool = False,
    distributed: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    prepare_timeout_s: float = DEFAULT_PREPARE_TIMEOUT_S,
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    progress: bool = True,
) -> list[Any]:
    """Train SAEs like ``dictionary_learning.training.trainSAE`` (same arguments, same folders),
    with full-state checkpoints, exact resume and several processes.

    Args beyond trainSAE's:
        checkpoint_every: write a full-state checkpoint every this many steps (needs ``save_dir``).
        keep_checkpoints: how many of the newest checkpoints to keep.
        resume: continue from the newest complete checkpoint in ``save_dir`` (a fresh start if
            there is none). ``data`` must be the same source, from its beginning. Without it a
            ``save_dir`` that holds another run's files (``trainer_<i>/``, ``resume/``,
            ``config.json``, ``ae.pt``) is refused with :class:`FileExistsError` before anything is
            written.
        distributed: ``None`` (one process), ``"trainers"`` or ``"data"`` (see
            :mod:`matryoshka_plugin.distributed`); ``data`` is read on rank 0 only.
        timeout_s: how long a collective of a training step waits for the other ranks before
            failing (applied to a process group created before ``train`` too).
        prepare_timeout_s: how long the ranks wait for one-off work that one rank does or whose
            length depends on the disk (skipping consumed batches on resume, the norm factor,
            reading and writing checkpoints and ``save_steps`` files) before failing.
        startup_timeout_s: how long the start-up rendezvous waits for every process of
            ``WORLD_SIZE`` (only where ``train`` creates the process group).
        progress: show a progress bar (rank 0).

    Returns this process's trainers (all of them with one process; its share with
    ``distributed="trainers"``).
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    steps = int(steps)
    if checkpoint_every is not None and (int(checkpoint_every) != checkpoint_every or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    if (checkpoint_every or resume) and save_dir is None:
        raise ValueError("checkpoint_every and resume need a save_dir to keep the checkpoints in")
    if (use_wandb or verbose) and not log_steps:
        raise ValueError("use_wandb and verbose log every log_steps steps: pass log_steps")
    if not trainer_configs:
        raise ValueError("trainer_configs is empty")
    run_cfg = run_cfg or {}

    ctx = setup(distributed, timeout_s, prepare_timeout_s=prepare_timeout_s, startup_timeout_s=startup_timeout_s)
    try:
        return _train(
            ctx, data, trainer_configs, steps, use_wandb, wandb_entity, wandb_project, save_steps, save_dir,
            log_steps, activations_split_by_head, transcoder, run_cfg, normalize_activations, verbose, device,
            autocast_dtype, checkpoint_every, keep_checkpoints, resume, progress,
        )
    except RuntimeError as e:
        # A failed collective of a training step (gloo/NCCL say little about why); the waits around
        # one-off work raise their own message, which starts with the rank.
        if not ctx.active or str(e).startswith(f"rank {ctx.rank}:") or not _collective_failure(e):
            raise
        raise RuntimeError(
            f"rank {ctx.rank}: a training collective failed: another rank died, or hung longer than "
            f"timeout_s={timeout_s:g} s: {e}"
        ) from e


def _collective_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out"))


def _build_trainers(ctx: DistributedRun, trainer_configs: list[dict]) -> tuple[list[int], list[Any]]:
    configs = [copy.copy(c) for c in trainer_configs]  # trainSAE mutates the caller's dicts; we do not
    for i, c in enumerate(configs):
        if "trainer" not in c:
            raise ValueError(f"trainer_configs[{i}] has no 'trainer' entry (the trainer class)")
        if "wandb_name" in c:
            c["wandb_name"] = f"{c['wandb_name']}_trainer_{i}"
    if ctx.mode == "trainers" and ctx.active:
        shares = assign_trainers([_trainer_cost(c) for c in configs], ctx.world_size)
        mine = shares[ctx.rank]
        idle = [r for r, share in enumerate(shares) if not share]
        if idle and (ctx.is_main or not mine):
            warnings.warn(
                f"distributed='trainers': {len(configs)} trainer config{'s' if len(configs) > 1 else ''} over "
                f"{ctx.world_size} processes, so "
                + (f"ranks {', '.join(map(str, idle))} train" if len(idle) > 1 else f"rank {idle[0]} trains")
                + " nothing (only receiving the batches); start at most as many processes as trainer configs",
                stacklevel=3,
            )
    else:
        mine = list(range(len(configs)))
    trainers = []
    for i in mine:
        c = dict(configs[i])
        cls = c.pop("trainer")
        if ctx.active and "device" in c and c["device"] is not None:
            try:
                c["device"] = ctx.device(str(c["device"]))
            except ValueError as e:
                raise ValueError(f"trainer_configs[{i}]: {e}") from None
        if ctx.mode == "data" and ctx.active and not getattr(cls, "supports_data_parallel", False):
            raise ValueError(
                f"trainer_configs[{i}]: {getattr(cls, '__name__', cls)} cannot train one SAE over several "
                "processes (distributed='data'); use distributed='trainers' to spread SAEs over the ranks"
            )
        trainers.append(cls(**c))
    if ctx.mode == "data" and ctx.active:
        collective = ProcessGroupCollective(ctx.group)
        for t in trainers:
            # Every rank starts from rank 0's weights and prefix generator, whatever the seeds.
            for tensor in list(t.ae.parameters()) + list(t.ae.buffers()):
                collective.broadcast_(tensor.data)
            t.generator.set_state(ctx.broadcast_object(t.generator.get_state()))
            t.collective = collective
    return mine, trainers


def _train(ctx, data, trainer_configs, steps, use_wandb, wandb_entity, wandb_project, save_steps, save_dir,
           log_steps, activations_split_by_head, transcoder, run_cfg, normalize_activations, verbose, device,
           autocast_dtype, checkpoint_every, keep_checkpoints, resume, progress):
    from dictionary_learning.training import get_norm_factor, log_stats, new_wandb_process

    device_type = "cuda" if "cuda" in device else "cpu"
    autocast = nullcontext() if device_type == "cpu" else torch.autocast(device_type=device_type, dtype=autocast_dtype)
    if save_dir is not None and not resume:
        _check_new_run_dir(ctx, save_dir)
    mine, trainers = _build_trainers(ctx, trainer_configs)
    n_all = len(trainer_configs)
    # In data-parallel mode every rank holds the same SAEs: rank 0 writes them.
    writes = ctx.is_main or ctx.mode == "trainers"
    store = RunCheckpoints(Path(save_dir) / "resume", keep_checkpoints) if save_dir is not None else None

    # -- resume -----------------------------------------------------------------------------------
    start, consumed, norm_factor, source_state = 0, 0, None, None
    found = None
    if resume:
        # Rank 0's listing: every rank tries the same checkpoints, whatever its view of the folder.
        names = ctx.broadcast_object([p.name for p in store.complete()] if ctx.is_main else None)
        found = store.load_latest(mine, agree=ctx.all_true, folders=[store.root / n for n in names])
    if found is not None:
        run = found.run
        problems = []
        if run["n_trainers"] != n_all:
            problems.append(f"{run['n_trainers']} trainers in the checkpoint, {n_all} now")
        if run["steps"] != steps:
            problems.append(f"steps: checkpoint {run['steps']}, now {steps}")
        if run["normalize_activations"] != bool(normalize_activations):
            problems.append(f"normalize_activations: checkpoint {run['normalize_activations']}, now {normalize_activations}")
        if run["distributed"] != ctx.mode:
            problems.append(f"distributed: checkpoint {run['distributed']!r}, now {ctx.mode!r}")
        if ctx.mode == "data" and run["world_size"] != ctx.world_size:
            problems.append(f"world size of the data-parallel run: checkpoint {run['world_size']}, now {ctx.world_size}")
        if problems:
            raise CheckpointError(f"cannot resume from {found.path}: " + "; ".join(problems))
        for i, t in zip(mine, trainers):
            state = found.trainers[i]
            try:
                load_trainer_state(t, state, restore_rng=False)
            except CheckpointError as e:
                raise CheckpointError(f"trainer_configs[{i}]: {e}") from None
        rngs = run["rng"]
        set_rng_state(rngs[ctx.rank] if ctx.mode == "trainers" and ctx.rank < len(rngs) else rngs[0])
        start, consumed, norm_factor, source_state = run["step"], run["batches"], run["norm_factor"], run["source"]

    # -- folders ------------------------------------------------------------------------------------
    save_dirs = {i: (os.path.join(save_dir, f"trainer_{i}") if save_dir is not None else None) for i in mine}
    # The data's settings (ctx_len, io, ...) for every rank's config.json: ranks 1+ may get data=None.
    buffer_config = getattr(data, "config", None) if ctx.is_main else None
    buffer_config = ctx.broadcast_object(buffer_config)

    def write_config(i: int, t: Any, trained_steps: int | None = None) -> None:
        if save_dirs[i] is None or not writes:
            return
        os.makedirs(save_dirs[i], exist_ok=True)
        config = {"trainer": dict(t.config)}
        if trained_steps is not None:
            # Written once training ends: fewer than "steps" when the data ran out first.
            config["trainer"]["trained_steps"] = trained_steps
        if norm_factor is not None:
            # trainSAE never saves it; a resumed run and the SAELens export need it.
            config["trainer"]["norm_factor"] = norm_factor
        if buffer_config is not None:
            config["buffer"] = buffer_config
        atomic_write_json(config, Path(save_dirs[i]) / "config.json", indent=4, default=_json_default)

    for i, t in zip(mine, trainers):
        write_config(i, t)

    # -- data -----------------------------------------------------------------------------------
    main_reads = ctx.is_main  # rank 0 reads the data (the only rank of a single-process run)
    resumable = main_reads and hasattr(data, "state_dict") and hasattr(data, "load_state_dict")
    if main_reads and data is None:
        raise ValueError("data is None on the process that reads it (rank 0)")
    if resumable and source_state is not None:
        data.load_state_dict(source_state)
    it: _Counted | None = None
    if main_reads:
        it = _Counted(iter(data))
        if found is not None and not resumable and consumed and start < steps:
            for _ in tqdm(range(consumed), desc="skipping consumed batches", disable=not progress):
                next(it)

    if normalize_activations and norm_factor is None:
        if main_reads:
            norm_factor = get_norm_factor(it, steps=NORM_FACTOR_BATCHES)
        norm_factor = ctx.broadcast_object(norm_factor)
        for i, t in zip(mine, trainers):
            t.ae.scale_biases(1.0)  # as trainSAE: every SAE must support scale_biases
            write_config(i, t)
    if main_reads and not _is_iterator(data) and found is None:
        # trainSAE iterates a re-iterable source afresh after computing the norm factor.
        it = _Counted(iter(data))
    # Rank 0 may have spent long on the above: the others wait here, not in a training collective.
    ctx.wait("preparing the data (skipping consumed batches on resume, the norm factor)")

    # -- wandb ----------------------------------------------------------------------------------
    log_queues, wandb_processes = [], []
    logs = (use_wandb or verbose) and (ctx.is_main or ctx.mode == "trainers")
    if use_wandb and logs:
        import torch.multiprocessing as mp

        for t in trainers:
            q = mp.Queue()
            wandb_config = {k: v.cpu().item() if isinstance(v, torch.Tensor) else v for k, v in (t.config | run_cfg).items()}
            p = mp.Process(target=new_wandb_process, args=(wandb_config, q, wandb_entity, wandb_project))
            p.start()
            log_queues.append(q)
            wandb_processes.append(p)

    # -- checkpoints ----------------------------------------------------------------------------------
    def checkpoint(done: int) -> None:
        states = {i: trainer_state_dict(t) for i, t in zip(mine, trainers)} if writes else {}
        store.write_trainers(done, states)
        gathered = ctx.gather_objects(rng_state())
        ctx.wait(f"writing the checkpoint of step {done}")  # every rank's trainer files are on disk
        if ctx.is_main:
            run = {
                "steps": steps,
                "batches": it.count if it is not None else 0,
                "source": data.state_dict() if resumable else None,
                "norm_factor": norm_factor,
                "normalize_activations": bool(normalize_activations),
                "n_trainers": n_all,
                "distributed": ctx.mode,
                "world_size": ctx.world_size,
                "rng": gathered,
            }
            store.publish(done, run, n_all)
        ctx.wait(f"publishing the checkpoint of step {done}")

    # -- the loop ---------------------------------------------------------------------------------------
    bar = tqdm(total=steps, initial=start, disable=not (progress and ctx.is_main), desc="training")
    step = start
    while step < steps:
        act = next(it, None) if main_reads else None
        act = ctx.broadcast_batch(act) if ctx.active else act
        if act is None:
            break  # the data ran out, as trainSAE's loop ends
        act = act.to(dtype=autocast_dtype)
        if normalize_activations:
            act = act / norm_factor  # trainSAE divides in place, which would alter a caller's tensors
        local = ctx.shard(act)

        if logs and step % log_steps == 0:
            log_stats(trainers, step, act, activations_split_by_head, transcoder, log_queues=log_queues, verbose=verbose)

        if save_steps is not None and step in save_steps and writes:
            for i, t in zip(mine, trainers):
                if save_dirs[i] is None:
                    continue
                os.makedirs(os.path.join(save_dirs[i], "checkpoints"), exist_ok=True)
                _save_weights(t, os.path.join(save_dirs[i], "checkpoints", f"ae_{step}.pt"),
                              norm_factor if normalize_activations else None)
        if save_steps is not None and step in save_steps:
            ctx.wait(f"saving ae_{step}.pt")

        for t in trainers:
            with autocast:
                t.update(step, local)
        step += 1
        bar.update(1)
        if checkpoint_every and (step % checkpoint_every == 0 or step == steps):
            checkpoint(step)  # the last one lets resume=True on a finished run just re-save it
    bar.close()
    if step < steps and ctx.is_main:
        warnings.warn(
            f"the data ran out after {step} of the {steps} steps asked for: training stopped early, with "
            f"schedules set for {steps} steps; config.json records trained_steps={step}",
            stacklevel=3,
        )

    for i, t in zip(mine, trainers):
        if normalize_activations:
            # As trainSAE: the returned SAEs take raw activations. Every rank scales its own, so
            # data-parallel ranks stay identical.
            t.ae.scale_biases(norm_factor)
        if save_dirs[i] is not None and writes:
            _save_weights(t, os.path.join(save_dirs[i], "ae.pt"))
            write_config(i, t, trained_steps=step)
    ctx.wait("saving ae.pt")

    for q in log_queues:
        q.put("DONE")
    for p in wandb_processes:
        p.join()
    return trainers
