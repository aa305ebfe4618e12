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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
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


# -- the run, named ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    """``train``'s settings for the steps, the data and the files, checked once."""

    steps: int
    device: str
    autocast_dtype: torch.dtype
    normalize_activations: bool
    save_dir: str | None
    save_steps: list[int] | None
    checkpoint_every: int | None
    keep_checkpoints: int
    resume: bool
    progress: bool

    def __post_init__(self) -> None:
        if self.checkpoint_every is not None and (
                int(self.checkpoint_every) != self.checkpoint_every or self.checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be a positive integer, got {self.checkpoint_every!r}")
        if (self.checkpoint_every or self.resume) and self.save_dir is None:
            raise ValueError("checkpoint_every and resume need a save_dir to keep the checkpoints in")

    def saves_at(self, step: int) -> bool:
        """Whether ``checkpoints/ae_<step>.pt`` is written before step ``step`` (trainSAE's save_steps)."""
        return self.save_steps is not None and step in self.save_steps

    def checkpoints_after(self, done: int) -> bool:
        """Whether a full-state checkpoint follows step ``done`` (the last one lets resume=True on a
        finished run just re-save it)."""
        return bool(self.checkpoint_every) and (done % self.checkpoint_every == 0 or done == self.steps)


@dataclass(frozen=True)
class _LogOptions:
    """trainSAE's logging settings."""

    use_wandb: bool
    verbose: bool
    log_steps: int | None
    wandb_entity: str
    wandb_project: str
    run_cfg: dict
    activations_split_by_head: bool
    transcoder: bool

    def __post_init__(self) -> None:
        if (self.use_wandb or self.verbose) and not self.log_steps:
            raise ValueError("use_wandb and verbose log every log_steps steps: pass log_steps")


@dataclass
class _RunState:
    """What the run advances, and what a checkpoint records of it besides the trainers."""

    step: int = 0
    """Steps done."""
    norm_factor: float | None = None
    """The activations' scale with ``normalize_activations`` (set once, before the first step)."""
    batches: _Counted | None = None
    """Rank 0's iterator over the data, counting the batches it handed out (None on other ranks)."""


@dataclass
class _Run:
    """One call of ``train`` on this process: what stays fixed, and ``state``, which advances."""

    ctx: DistributedRun
    opts: _Options
    mine: list[int]
    """Indices in ``trainer_configs`` of this process's trainers."""
    trainers: list[Any]
    n_trainers: int
    """Trainers of the whole run (all ranks)."""
    store: RunCheckpoints | None
    data: Any
    """The data source (rank 0 reads it; other ranks may get None)."""
    buffer_config: Any
    """The data's settings (ctx_len, io, ...), rank 0's, for every rank's config.json."""
    autocast: AbstractContextManager
    state: _RunState

    @property
    def writes(self) -> bool:
        """Whether this rank writes its trainers' files (in data-parallel mode every rank holds the
        same SAEs: rank 0 writes them)."""
        return self.ctx.is_main or self.ctx.mode == "trainers"

    @property
    def resumable(self) -> bool:
        """Whether the data position is the source's own state (else: the batches drawn)."""
        return self.ctx.is_main and hasattr(self.data, "state_dict") and hasattr(self.data, "load_state_dict")

    def own(self) -> Iterator[tuple[int, Any]]:
        """This process's trainers with their indices in ``trainer_configs``."""
        return zip(self.mine, self.trainers)

    def trainer_dir(self, i: int) -> str | None:
        return os.path.join(self.opts.save_dir, f"trainer_{i}") if self.opts.save_dir is not None else None


# -- train ------------------------------------------------------------------------------------------


# Over 60 lines for a reason: trainSAE's signature (so a pipeline swaps one import) and the
# docstring of the arguments it adds; the body checks the arguments and hands over to _train.
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
    opts = _Options(
        steps=int(steps), device=device, autocast_dtype=autocast_dtype,
        normalize_activations=normalize_activations, save_dir=save_dir, save_steps=save_steps,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, resume=resume, progress=progress)
    log_opts = _LogOptions(
        use_wandb=use_wandb, verbose=verbose, log_steps=log_steps, wandb_entity=wandb_entity,
        wandb_project=wandb_project, run_cfg=run_cfg or {},
        activations_split_by_head=activations_split_by_head, transcoder=transcoder)
    if not trainer_configs:
        raise ValueError("trainer_configs is empty")

    ctx = setup(distributed, timeout_s, prepare_timeout_s=prepare_timeout_s, startup_timeout_s=startup_timeout_s)
    try:
        return _train(ctx, data=data, trainer_configs=trainer_configs, opts=opts, log_opts=log_opts)
    except RuntimeError as e:
        # A failed collective of a training step (gloo/NCCL say little about why); the waits around
        # one-off work raise their own message, which starts with the rank.
        if not ctx.active or str(e).startswith(f"rank {ctx.rank}:") or not _collective_failure(e):
            raise
        raise RuntimeError(
            f"rank {ctx.rank}: a training collective failed: another rank died, or hung longer than "
            f"timeout_s={timeout_s:g} s: {e}"
        ) from e


def _train(ctx: DistributedRun, *, data: Any, trainer_configs: list[dict], opts: _Options,
           log_opts: _LogOptions) -> list[Any]:
    """The run in order: build the trainers, resume, write the configs, open the data, the steps,
    the final weights. Every rank calls the same collectives in the same order."""
    autocast = _autocast(opts)
    if opts.save_dir is not None and not opts.resume:
        _check_new_run_dir(ctx, opts.save_dir)
    mine, trainers = _build_trainers(ctx, trainer_configs)
    store = RunCheckpoints(Path(opts.save_dir) / "resume", opts.keep_checkpoints) if opts.save_dir is not None else None
    resumed = None
    if opts.resume:
        resumed = _resume(ctx, store=store, opts=opts, mine=mine, trainers=trainers, n_trainers=len(trainer_configs))
    run = _Run(
        ctx=ctx, opts=opts, mine=mine, trainers=trainers, n_trainers=len(trainer_configs), store=store, data=data,
        # ranks 1+ may get data=None
        buffer_config=ctx.broadcast_object(getattr(data, "config", None) if ctx.is_main else None),
        autocast=autocast,
        state=_RunState(step=resumed.step, norm_factor=resumed.norm_factor) if resumed is not None else _RunState(),
    )
    for i, t in run.own():
        _write_config(run, i=i, trainer=t)
    _open_data(run, resumed=resumed)
    logger = _Logger(log_opts, ctx=ctx, trainers=trainers)
    _loop(run, logger=logger)
    _save_final(run)
    logger.close()
    return trainers


def _autocast(opts: _Options) -> AbstractContextManager:
    device_type = "cuda" if "cuda" in opts.device else "cpu"
    if device_type == "cpu":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=opts.autocast_dtype)


# -- before the first step: the folder, the trainers, resume ---------------------------------------------


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


def _build_trainers(ctx: DistributedRun, trainer_configs: list[dict]) -> tuple[list[int], list[Any]]:
    """This process's share of the trainers (indices in ``trainer_configs``, trainers); in
    data-parallel mode every rank starts from rank 0's weights."""
    configs = [copy.copy(c) for c in trainer_configs]  # trainSAE mutates the caller's dicts; we do not
    for i, c in enumerate(configs):
        if "trainer" not in c:
            raise ValueError(f"trainer_configs[{i}] has no 'trainer' entry (the trainer class)")
        if "wandb_name" in c:
            c["wandb_name"] = f"{c['wandb_name']}_trainer_{i}"
    if ctx.mode == "trainers" and ctx.active:
        mine = _my_share(ctx, configs)
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
            t.bind_collective(collective)
    return mine, trainers


def _my_share(ctx: DistributedRun, configs: list[dict]) -> list[int]:
    """``distributed="trainers"``: this rank's trainer indices, balanced by cost; warns about idle ranks."""
    shares = assign_trainers([_trainer_cost(c) for c in configs], ctx.world_size)
    mine = shares[ctx.rank]
    idle = [r for r, share in enumerate(shares) if not share]
    if idle and (ctx.is_main or not mine):
        warnings.warn(
            f"distributed='trainers': {len(configs)} trainer config{'s' if len(configs) > 1 else ''} over "
            f"{ctx.world_size} processes, so "
            + (f"ranks {', '.join(map(str, idle))} train" if len(idle) > 1 else f"rank {idle[0]} trains")
            + " nothing (only receiving the batches); start at most as many processes as trainer configs",
            stacklevel=5,  # train's caller
        )
    return mine


@dataclass(frozen=True)
class _Resumed:
    """Where a checkpoint left the run."""

    path: Path
    step: int
    batches: int
    """Batches rank 0 had drawn (the position of a source without ``state_dict``)."""
    norm_factor: float | None
    source: Any
    """The source's ``state_dict()``, where it has one."""


def _resume(ctx: DistributedRun, *, store: RunCheckpoints, opts: _Options, mine: list[int],
            trainers: list[Any], n_trainers: int) -> _Resumed | None:
    """Load the newest usable checkpoint into this process's trainers and the RNGs; None if there is none."""
    # Rank 0's listing: every rank tries the same checkpoints, whatever its view of the folder.
    names = ctx.broadcast_object([p.name for p in store.complete()] if ctx.is_main else None)
    found = store.load_latest(mine, agree=ctx.all_true, folders=[store.root / n for n in names])
    if found is None:
        return None
    run = found.run
    _check_same_run(ctx, run=run, path=found.path, opts=opts, n_trainers=n_trainers)
    for i, t in zip(mine, trainers):
        try:
            load_trainer_state(t, found.trainers[i], restore_rng=False)
        except CheckpointError as e:
            raise CheckpointError(f"trainer_configs[{i}]: {e}") from None
    rngs = run["rng"]
    set_rng_state(rngs[ctx.rank] if ctx.mode == "trainers" and ctx.rank < len(rngs) else rngs[0])
    return _Resumed(path=found.path, step=run["step"], batches=run["batches"], norm_factor=run["norm_factor"],
                    source=run["source"])


def _check_same_run(ctx: DistributedRun, *, run: dict[str, Any], path: Path, opts: _Options, n_trainers: int) -> None:
    """Refuse a checkpoint of a differently set-up run, naming every difference."""
    problems = []
    if run["n_trainers"] != n_trainers:
        problems.append(f"{run['n_trainers']} trainers in the checkpoint, {n_trainers} now")
    if run["steps"] != opts.steps:
        problems.append(f"steps: checkpoint {run['steps']}, now {opts.steps}")
    if run["normalize_activations"] != bool(opts.normalize_activations):
        problems.append(
            f"normalize_activations: checkpoint {run['normalize_activations']}, now {opts.normalize_activations}")
    if run["distributed"] != ctx.mode:
        problems.append(f"distributed: checkpoint {run['distributed']!r}, now {ctx.mode!r}")
    if ctx.mode == "data" and run["world_size"] != ctx.world_size:
        problems.append(f"world size of the data-parallel run: checkpoint {run['world_size']}, now {ctx.world_size}")
    if problems:
        raise CheckpointError(f"cannot resume from {path}: " + "; ".join(problems))


def _write_config(run: _Run, *, i: int, trainer: Any, trained_steps: int | None = None) -> None:
    """``trainer_<i>/config.json``, as trainSAE writes it, plus the norm factor and the steps trained."""
    folder = run.trainer_dir(i)
    if folder is None or not run.writes:
        return
    os.makedirs(folder, exist_ok=True)
    config = {"trainer": dict(trainer.config)}
    if trained_steps is not None:
        # Written once training ends: fewer than "steps" when the data ran out first.
        config["trainer"]["trained_steps"] = trained_steps
    if run.state.norm_factor is not None:
        # trainSAE never saves it; a resumed run and the SAELens export need it.
        config["trainer"]["norm_factor"] = run.state.norm_factor
    if run.buffer_config is not None:
        config["buffer"] = run.buffer_config
    atomic_write_json(config, Path(folder) / "config.json", indent=4, default=_json_default)


# -- the data: its position and scale --------------------------------------------------------------------


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


def _open_data(run: _Run, *, resumed: _Resumed | None) -> None:
    """Rank 0 opens the data at the checkpoint's position (or its start); every rank gets the norm
    factor of a fresh run with ``normalize_activations``."""
    ctx, data, state = run.ctx, run.data, run.state
    if ctx.is_main:
        if data is None:
            raise ValueError("data is None on the process that reads it (rank 0)")
        if run.resumable and resumed is not None and resumed.source is not None:
            data.load_state_dict(resumed.source)
        state.batches = _Counted(iter(data))
        if resumed is not None and not run.resumable and resumed.batches and resumed.step < run.opts.steps:
            for _ in tqdm(range(resumed.batches), desc="skipping consumed batches", disable=not run.opts.progress):
                next(state.batches)
    if run.opts.normalize_activations and state.norm_factor is None:
        _set_norm_factor(run)
    if ctx.is_main and not _is_iterator(data) and resumed is None:
        # trainSAE iterates a re-iterable source afresh after computing the norm factor.
        state.batches = _Counted(iter(data))
    # Rank 0 may have spent long on the above: the others wait here, not in a training collective.
    ctx.wait("preparing the data (skipping consumed batches on resume, the norm factor)")


def _set_norm_factor(run: _Run) -> None:
    """trainSAE's norm factor, from rank 0's first batches, on every rank; recorded in config.json."""
    from dictionary_learning.training import get_norm_factor

    norm_factor = get_norm_factor(run.state.batches, steps=NORM_FACTOR_BATCHES) if run.ctx.is_main else None
    run.state.norm_factor = run.ctx.broadcast_object(norm_factor)
    for i, t in run.own():
        t.ae.scale_biases(1.0)  # as trainSAE: every SAE must support scale_biases
        _write_config(run, i=i, trainer=t)


# -- the steps ------------------------------------------------------------------------------------------


def _loop(run: _Run, *, logger: _Logger) -> None:
    """One batch to every trainer per step, until ``steps`` or the end of the data."""
    ctx, opts, state = run.ctx, run.opts, run.state
    bar = tqdm(total=opts.steps, initial=state.step, disable=not (opts.progress and ctx.is_main), desc="training")
    while state.step < opts.steps:
        act = _next_batch(run)
        if act is None:
            break  # the data ran out, as trainSAE's loop ends
        local = ctx.shard(act)
        logger.log(state.step, act)
        if opts.saves_at(state.step):
            _save_step_weights(run)
        for t in run.trainers:
            with run.autocast:
                t.update(state.step, local)
        state.step += 1
        bar.update(1)
        if opts.checkpoints_after(state.step):
            _checkpoint(run)
    bar.close()
    if state.step < opts.steps and ctx.is_main:
        warnings.warn(
            f"the data ran out after {state.step} of the {opts.steps} steps asked for: training stopped early, "
            f"with schedules set for {opts.steps} steps; config.json records trained_steps={state.step}",
            stacklevel=4,  # train's caller
        )


def _next_batch(run: _Run) -> torch.Tensor | None:
    """This step's batch on every rank (rank 0 reads it), in the training dtype and scale; None once
    the data ran out."""
    act = next(run.state.batches, None) if run.ctx.is_main else None
    act = run.ctx.broadcast_batch(act) if run.ctx.active else act
    if act is None:
        return None
    act = act.to(dtype=run.opts.autocast_dtype)
    if run.opts.normalize_activations:
        act = act / run.state.norm_factor  # trainSAE divides in place, which would alter a caller's tensors
    return act


class _Logger:
    """trainSAE's logging: ``log_stats`` every ``log_steps`` steps, to stdout and wandb processes."""

    def __init__(self, opts: _LogOptions, *, ctx: DistributedRun, trainers: list[Any]):
        self.opts, self.trainers = opts, trainers
        self.queues: list[Any] = []
        self.processes: list[Any] = []
        self.active = (opts.use_wandb or opts.verbose) and (ctx.is_main or ctx.mode == "trainers")
        if opts.use_wandb and self.active:
            import torch.multiprocessing as mp
            from dictionary_learning.training import new_wandb_process

            for t in trainers:
                q = mp.Queue()
                wandb_config = {k: v.cpu().item() if isinstance(v, torch.Tensor) else v
                                for k, v in (t.config | opts.run_cfg).items()}
                p = mp.Process(target=new_wandb_process, args=(wandb_config, q, opts.wandb_entity, opts.wandb_project))
                p.start()
                self.queues.append(q)
                self.processes.append(p)

    def log(self, step: int, act: torch.Tensor) -> None:
        if not self.active or step % self.opts.log_steps:
            return
        from dictionary_learning.training import log_stats

        log_stats(self.trainers, step, act, self.opts.activations_split_by_head, self.opts.transcoder,
                  log_queues=self.queues, verbose=self.opts.verbose)

    def close(self) -> None:
        for q in self.queues:
            q.put("DONE")
        for p in self.processes:
            p.join()


# -- the files: save_steps weights, checkpoints, the final weights -------------------------------------


def _save_step_weights(run: _Run) -> None:
    """trainSAE's ``checkpoints/ae_<step>.pt`` before step ``run.state.step``, for raw activations."""
    step = run.state.step
    if run.writes:
        for i, t in run.own():
            folder = run.trainer_dir(i)
            if folder is None:
                continue
            os.makedirs(os.path.join(folder, "checkpoints"), exist_ok=True)
            _save_weights(t, os.path.join(folder, "checkpoints", f"ae_{step}.pt"),
                          norm_factor=run.state.norm_factor if run.opts.normalize_activations else None)
    run.ctx.wait(f"saving ae_{step}.pt")


def _checkpoint(run: _Run) -> None:
    """The full state after ``run.state.step`` steps: every rank writes its trainers, then rank 0
    the run's position and every rank's RNG states, which publishes the checkpoint."""
    ctx, state, done = run.ctx, run.state, run.state.step
    states = {i: trainer_state_dict(t) for i, t in run.own()} if run.writes else {}
    run.store.write_trainers(done, states)
    gathered = ctx.gather_objects(rng_state())
    ctx.wait(f"writing the checkpoint of step {done}")  # every rank's trainer files are on disk
    if ctx.is_main:
        record = {
            "steps": run.opts.steps,
            "batches": state.batches.count if state.batches is not None else 0,
            "source": run.data.state_dict() if run.resumable else None,
            "norm_factor": state.norm_factor,
            "normalize_activations": bool(run.opts.normalize_activations),
            "n_trainers": run.n_trainers,
            "distributed": ctx.mode,
            "world_size": ctx.world_size,
            "rng": gathered,
        }
        run.store.publish(done, record, run.n_trainers)
    ctx.wait(f"publishing the checkpoint of step {done}")


def _save_final(run: _Run) -> None:
    """As trainSAE: the returned and saved SAEs take raw activations; ``ae.pt`` and config.json
    with the steps trained."""
    for i, t in run.own():
        if run.opts.normalize_activations:
            # Every rank scales its own, so data-parallel ranks stay identical.
            t.ae.scale_biases(run.state.norm_factor)
        folder = run.trainer_dir(i)
        if folder is not None and run.writes:
            _save_weights(t, os.path.join(folder, "ae.pt"))
            _write_config(run, i=i, trainer=t, trained_steps=run.state.step)
    run.ctx.wait("saving ae.pt")


def _save_weights(trainer: Any, path: str, *, norm_factor: float | None = None) -> None:
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


def _collective_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out"))
