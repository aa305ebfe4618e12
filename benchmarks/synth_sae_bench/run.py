"""Train every variant on one pool of synthetic samples, evaluate with SAELens, write the table.

Every SAE of a protocol reads the same batches in the same order (``model.sample_pool``) and is
scored by ``sae_lens.synthetic.eval_sae_on_synthetic_data`` on the same held-out samples. This
package's trainers train through :func:`matryoshka_plugin.train` (trainSAE's loop) and are
exported with :func:`matryoshka_plugin.export_to_saelens`; SAELens' BatchTopK and
MatryoshkaBatchTopK training SAEs train with SAELens' ``SAETrainer`` (the settings
``train_toy_sae`` and ``SyntheticSAERunner`` use). One CSV row per SAE; rows already present
are skipped, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import csv
import io
import shutil
import statistics
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import torch

from matryoshka_plugin.io import UnsafeCheckpointError, atomic_open, load_torch_file
from matryoshka_plugin.resume import RunCheckpoints

from ..harness import fmt_mean_std, markdown_table, mean_std, write_csv
from .config import PUBLISHED, Protocol, Variant
from .model import Replayable

__all__ = ["COLUMNS", "Pool", "read_rows", "run_benchmark", "write_markdown"]

COLUMNS = ["protocol", "sae", "source", "l0", "seed", "f1", "mcc", "uniqueness", "explained_variance", "dead"]


class Pool(Replayable):
    """The training batches: the cached samples in order, ``epochs`` times (the same for every SAE)."""

    def __init__(self, hidden: torch.Tensor, batch_size: int, epochs: int, device: str):
        self.hidden, self.batch_size, self.epochs, self.device = hidden, batch_size, epochs, device
        self.batches_per_epoch = hidden.shape[0] // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"{hidden.shape[0]} samples hold no batch of {batch_size}")

    @property
    def steps(self) -> int:
        return self.batches_per_epoch * self.epochs

    @property
    def samples(self) -> int:
        return self.steps * self.batch_size

    def from_step(self, start: int) -> Iterator[torch.Tensor]:
        for step in range(start, self.steps):
            i = step % self.batches_per_epoch
            yield self.hidden[i * self.batch_size : (i + 1) * self.batch_size].to(self.device)


class _Replay:
    """An ``ActivationGenerator`` stand-in for the eval: hands out the cached feature activations."""

    def __init__(self, features: torch.Tensor, device: str):
        self.features, self.device, self.at = features, device, 0

    def sample(self, n: int) -> torch.Tensor:
        rows = self.features.index_select(0, torch.arange(self.at, self.at + n))
        self.at += n
        return rows.to_dense().to(self.device)


def _evaluate(sae: Any, model: Any, eval_features: torch.Tensor, device: str) -> dict[str, float]:
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    n = eval_features.shape[0]
    res = eval_sae_on_synthetic_data(sae.to(device), model.feature_dict.to(device), _Replay(eval_features, device),
                                     num_samples=n, batch_size=1024)
    return dict(l0_measured=res.sae_l0, f1=res.classification.f1_score, mcc=res.mcc, uniqueness=res.uniqueness,
                explained_variance=res.explained_variance, dead=res.dead_latents)


TRAINERS = ("batchtopk", "logsparsity")
"""``Variant.options["trainer"]``: this package's ``MatryoshkaBatchTopKTrainer`` (the default) or
``MatryoshkaLogSparsityTrainer``."""


NO_ABLATION = dict(encoder_gain=None, recon_scale=None, grad_clip=True)
"""The ablation options of a BatchTopK variant (``Variant.options``) at their defaults: the trainer as is."""


def _ablated(base: type, encoder_gain: float | None, recon_scale: float | None, grad_clip: bool) -> type:
    """``base`` (the BatchTopK trainer class), or a subclass with the benchmark's ablations: ``W_enc``
    times ``encoder_gain`` once built, the reconstruction term times ``recon_scale`` in the training
    loss (AuxK unchanged), and with ``grad_clip=False`` the clipping undone (:func:`_undo_clipping`)."""
    if dict(encoder_gain=encoder_gain, recon_scale=recon_scale, grad_clip=grad_clip) == NO_ABLATION:
        return base

    class Ablated(base):  # type: ignore[misc, valid-type]
        def __init__(self, **settings: Any):
            super().__init__(**settings)
            if encoder_gain is not None:
                with torch.no_grad():
                    self.ae.W_enc.mul_(encoder_gain)
            if not grad_clip:
                _undo_clipping(self)

        def _forward(self, x: torch.Tensor, step: int | None, training: bool, **kwargs: Any) -> Any:
            out = super()._forward(x, step, training, **kwargs)
            if recon_scale is None or not training:
                return out
            return out._replace(loss=out.loss + (recon_scale - 1.0) * out.recon.loss)

    Ablated.__name__ = Ablated.__qualname__ = f"Ablated{base.__name__}"
    return Ablated


def _undo_clipping(trainer: Any) -> None:
    """Train ``trainer`` (a ``MatryoshkaBatchTopKTrainer``) without its ``clip_grad_norm_(1.0)``: each
    gradient is saved as backward leaves it, and just before Adam steps the saved gradients are put
    back, with the decoder's radial component removed again as the trainer does before clipping."""
    from matryoshka_plugin.trainers.common import project_out_radial_

    params = list(trainer.ae.parameters())
    saved: dict[int, torch.Tensor] = {}

    def keep(p: torch.Tensor) -> None:
        saved[id(p)] = p.grad.detach().clone()

    for p in params:
        p.register_post_accumulate_grad_hook(keep)

    def restore(*_: Any) -> None:
        with torch.no_grad():
            for p in params:
                if p.grad is None:
                    continue
                if id(p) not in saved:
                    raise RuntimeError("a gradient reached the optimizer without passing backward's hook")
                p.grad.copy_(saved.pop(id(p)))
            W = trainer.ae.W_dec
            project_out_radial_(W.grad, W)

    trainer.optimizer.register_step_pre_hook(restore)


def _as_batchtopk(sae: Any, k: int) -> Any:
    """The exported SAE's weights in SAELens' ``BatchTopKTrainingSAE``: scored as SAELens scores its
    training SAEs (the top ``k * B`` pre-activations of each eval batch), not by its threshold."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    cfg = sae.cfg
    if cfg.normalize_activations != "none":
        raise ValueError(f"BatchTopK scoring needs an export without input normalisation, got {cfg.normalize_activations}")
    btk = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
        k=k, d_in=cfg.d_in, d_sae=cfg.d_sae, apply_b_dec_to_input=cfg.apply_b_dec_to_input,
        rescale_acts_by_decoder_norm=False, device=str(sae.W_enc.device)))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(btk, name).copy_(getattr(sae, name))
    return btk


def _train_ours(p: Protocol, v: Variant, l0: int, seed: int, pool: Replayable, folder: Path,
                checkpoint_every: int | None = None) -> Any:
    """Train ``v`` with :func:`matryoshka_plugin.train`, export it to SAELens and load it back. With
    ``checkpoint_every``, full-state checkpoints go to ``folder/train/resume`` and a rerun continues
    from the newest one (the data at its batch, bit for bit as an uninterrupted run)."""
    from sae_lens import SAE

    from matryoshka_plugin import MatryoshkaBatchTopKTrainer, MatryoshkaLogSparsityTrainer, export_to_saelens, train

    steps = pool.steps
    options = dict(v.options)
    trainer = options.pop("trainer", "batchtopk")
    anneal = options.pop("k_anneal", None)
    ablations = {name: options.pop(name, default) for name, default in NO_ABLATION.items()}
    eval_rule = options.pop("eval_rule", "trained")
    if eval_rule not in ("trained", "batchtopk"):
        raise ValueError(f"eval_rule must be 'trained' or 'batchtopk', got {eval_rule!r}")
    shared = dict(steps=steps, activation_dim=p.hidden_dim, dict_size=p.width, seed=seed, device=p.device, layer=0,
                  lm_name="synthetic",
                  # the same dead-latent window as SAELens' dead_feature_window (AuxK here, resampling there)
                  dead_feature_threshold=p.dead_window * p.batch_size)
    if trainer == "logsparsity":
        if anneal is not None or ablations != NO_ABLATION:
            raise ValueError("k_anneal and the ablation options apply to the BatchTopK trainer")
        # random Pareto prefixes, the controller steering the sparsity coefficient to the target L0;
        # the optimiser settings are the trainer's own (lr 3e-3, Adam (0.5, 0.9375), decay over the
        # last 20%), its 100 warm-up steps cut to a tenth of a shorter run
        cfg = dict(trainer=MatryoshkaLogSparsityTrainer, target_l0=l0, warmup_steps=min(100, steps // 10), **shared)
        cfg.update(options)
    elif trainer == "batchtopk":
        widths = list(p.matryoshka_widths)
        fractions = [(b - a) / p.width for a, b in zip([0, *widths[:-1]], widths)]
        cfg = dict(
            trainer=_ablated(MatryoshkaBatchTopKTrainer, **ablations), k=l0, group_fractions=fractions, lr=p.lr,
            warmup_steps=0, threshold_start_step=min(1000, steps // 4),
            # the inference threshold's EMA at SAELens' rate (topk_threshold_lr=0.01): with the default
            # 0.999 the threshold lags over a short run and the exported SAE fires below the target L0
            threshold_beta=0.99,
            k_anneal_steps=int(anneal * steps) if anneal else None, **shared,
        )
        cfg.update(options)  # a variant's keywords win over the protocol's (lr, ...)
    else:
        raise ValueError(f"trainer must be one of {TRAINERS}, got {trainer!r}")
    train(pool, [cfg], steps, save_dir=str(folder / "train"), device=p.device, progress=False,
          checkpoint_every=checkpoint_every, resume=True)
    export_to_saelens(folder / "train" / "trainer_0", folder / "saelens", model_name="synthetic",
                      hook_name="synthetic", overwrite=True)
    sae = SAE.load_from_disk(str(folder / "saelens"), device=p.device)
    return _as_batchtopk(sae, l0) if eval_rule == "batchtopk" else sae


def _train_saelens(p: Protocol, v: Variant, l0: int, seed: int, pool: Replayable, folder: Path | None = None,
                   checkpoint_every: int | None = None) -> Any:
    """Train ``v`` with SAELens' ``SAETrainer``. With ``folder`` and ``checkpoint_every``, SAELens'
    own checkpoints (``SAETrainer.save_checkpoint``: weights, optimizer, scheduler, dead-latent
    counters) are written every that many steps to ``folder/checkpoints/step_<N>`` and a rerun
    continues from the newest one that reads back (``load_weights_from_checkpoint`` and
    ``load_trainer_state``), on the data from batch N."""
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    options = dict(v.options)
    architecture, b_dec_init = options.pop("architecture"), options.pop("b_dec_init", "zeros")
    unit_decoder, lr = options.pop("unit_decoder", False), options.pop("lr", p.lr)  # lr: SAETrainerConfig's
    torch.manual_seed(seed)
    if architecture == "batchtopk":  # other options: fields of SAELens' config (decoder_init_norm...)
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=l0, d_in=p.hidden_dim, d_sae=p.width, **options))
    else:  # inner widths as synth-sae-bench-experiments (the outer level is the SAE itself)
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            k=l0, d_in=p.hidden_dim, d_sae=p.width, matryoshka_widths=list(p.matryoshka_widths), **options))
    if b_dec_init == "geometric_median":  # as this package's trainers: Weiszfeld on the first batch
        from matryoshka_plugin.trainers.common import geometric_median

        with torch.no_grad():
            sae.b_dec.copy_(geometric_median(next(iter(pool))).to(sae.b_dec.dtype))
    elif b_dec_init != "zeros":
        raise ValueError(f"b_dec_init must be 'zeros' (SAELens) or 'geometric_median', got {b_dec_init!r}")
    cfg = SAETrainerConfig(
        total_training_samples=pool.samples, train_batch_size_samples=p.batch_size, lr=lr, lr_end=lr,
        lr_scheduler_name="constant", device=p.device, dead_feature_window=p.dead_window, feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
    )
    start, found = 0, _latest_saelens_checkpoint(folder / "checkpoints") if folder is not None else None
    if found is not None:
        start = int(found.name[len("step_"):])
    batches = _SAELensCheckpoints(pool.from_step(start), start, checkpoint_every,
                                  folder / "checkpoints" if folder is not None else None)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches)
    batches.trainer = trainer
    if unit_decoder:  # decoder rows back to norm 1 after every step, as this package's trainers keep them

        def renormalise(*_):
            with torch.no_grad():
                sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))

        trainer.optimizer.register_step_post_hook(renormalise)
    if found is not None:
        sae.load_weights_from_checkpoint(found)
        trainer.load_trainer_state(found)
        if trainer.n_training_steps != start:
            raise RuntimeError(f"{found} holds step {trainer.n_training_steps}, its name says {start}")
        print(f"{v.name}: resumed SAELens' trainer at step {start}", flush=True)
    return trainer.fit()


KEEP_CHECKPOINTS = 2
"""Newest checkpoints kept per SAE while it trains (all are removed once its row is written)."""


class _SAELensCheckpoints:
    """SAELens' data provider, which also checkpoints its trainer every ``every`` steps. ``next`` is
    called at the top of a step, when the previous step is complete (counters, optimizer, weights),
    so a checkpoint written there is the state after ``step`` steps. Each is written to a hidden
    folder and renamed (:class:`matryoshka_plugin.resume.RunCheckpoints`, as ``train`` writes its
    own), so a ``step_<N>`` folder is whole."""

    def __init__(self, batches: Iterator[torch.Tensor], start: int, every: int | None, folder: Path | None):
        self.batches, self.step, self.start, self.every = batches, start, start, every
        self.store = RunCheckpoints(folder, KEEP_CHECKPOINTS) if folder is not None else None
        self.trainer: Any = None

    def __iter__(self) -> "_SAELensCheckpoints":
        return self

    def __next__(self) -> torch.Tensor:
        if self.every and self.store is not None and self.step > self.start and self.step % self.every == 0:
            staging = self.store.staging(self.step)
            shutil.rmtree(staging, ignore_errors=True)
            self.trainer.save_checkpoint(staging.name, base_path=self.store.root)
            self.store.promote(self.step)
        x = next(self.batches)
        self.step += 1
        return x


def _latest_saelens_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose weights and trainer state read back; a damaged one is skipped
    with a warning (as :func:`matryoshka_plugin.train` does with its own)."""
    import warnings

    from sae_lens.constants import ACTIVATION_SCALER_CFG_FILENAME, SAE_WEIGHTS_FILENAME, TRAINER_STATE_FILENAME
    from safetensors.torch import load_file

    for path in RunCheckpoints(folder).complete():
        try:
            load_file(path / SAE_WEIGHTS_FILENAME)
            # SAELens stores tensors, numbers and state dicts only: weights_only=True reads it (and
            # SAELens' own load_trainer_state then reads the same file with torch's default).
            load_torch_file(path / TRAINER_STATE_FILENAME, "SAELens trainer state")
            if not (path / ACTIVATION_SCALER_CFG_FILENAME).is_file():
                raise FileNotFoundError(ACTIVATION_SCALER_CFG_FILENAME)
        except UnsafeCheckpointError:
            raise  # written on purpose to run code: never skipped like a damaged file
        except Exception as e:  # noqa: BLE001 - any unreadable file means: use the previous one
            warnings.warn(f"skipping the unreadable SAELens checkpoint {path}: {e}", stacklevel=2)
            continue
        return path
    return None


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    """The rows of a results CSV (empty when it does not exist).

    A last line without its line end is what an interrupted append leaves (earlier versions
    appended; a copy can be cut short too): it is dropped with a warning, so that SAE is trained
    again. Any other malformed line raises, naming the file and the line."""
    if not csv_path.exists():
        return []
    with csv_path.open(newline="") as f:
        text = f.read()
    if text and not text.endswith(("\n", "\r")):
        cut = max(text.rfind("\n"), text.rfind("\r")) + 1
        warnings.warn(f"{csv_path}: dropping its last line {text[cut:]!r}, which was cut short (no line end); "
                      "that SAE is trained and scored again", stacklevel=2)
        text = text[:cut]
    if not text.strip():
        return []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames != COLUMNS:
        raise ValueError(f"{csv_path} has the columns {reader.fieldnames}, expected {COLUMNS}")
    rows = []
    for r in reader:
        try:
            if None in r or any(r[c] in (None, "") for c in COLUMNS):
                raise ValueError("wrong number of fields")
            int(r["l0"]), int(r["seed"])
        except ValueError as e:
            raise ValueError(f"{csv_path} line {reader.line_num} is malformed ({e}): {r}") from None
        rows.append(r)
    return rows


def _done(csv_path: Path) -> set[tuple[str, str, int, int]]:
    return {(r["protocol"], r["sae"], int(r["l0"]), int(r["seed"])) for r in read_rows(csv_path)}


def _append(csv_path: Path, row: dict) -> None:
    """Add ``row`` by writing the whole CSV anew and renaming it into place: a reader (or the next
    run after a crash) sees the old rows or the old rows and this one, never half a row."""
    write_csv(csv_path, read_rows(csv_path) + [row], COLUMNS)


def run_benchmark(p: Protocol, label: str, variants: list[Variant], model: Any, pool: Replayable,
                  eval_features: torch.Tensor, work: Path, csv_path: Path, seeds: tuple[int, ...],
                  l0s: tuple[int, ...], checkpoint_every: int | None = None) -> list[dict]:
    """Train and score every (variant, L0, seed) missing from ``csv_path``; returns the new rows.

    With ``checkpoint_every``, every SAE (this package's and SAELens') checkpoints its full state
    that often, and an SAE interrupted mid-training continues from its newest checkpoint; the
    checkpoints are removed once its row is written."""
    done, rows = _done(csv_path), []
    # the main variants with every seed first, then the others with the first seed
    order = [(v, s) for s in seeds for v in variants if v.main] + [(v, seeds[0]) for v in variants if not v.main]
    for l0 in l0s:
        for v, seed in order:
            if (label, v.name, l0, seed) in done:
                continue
            t0 = time.time()
            folder = work / f"{v.name}-l0{l0}-s{seed}"
            with torch.random.fork_rng():
                if v.source == "saelens":
                    sae = _train_saelens(p, v, l0, seed, pool, folder, checkpoint_every)
                    sae.save_inference_model(str(folder / "saelens"))  # for the hedging report
                else:
                    sae = _train_ours(p, v, l0, seed, pool, folder, checkpoint_every)
                scores = _evaluate(sae, model, eval_features, p.device)
            row = dict(protocol=label, sae=v.name, source=v.source, l0=l0, seed=seed,
                       **{k: (round(x, 4) if isinstance(x, float) else x) for k, x in scores.items()})
            _append(csv_path, row)
            rows.append(row)
            for done_with in (folder / "checkpoints", folder / "train" / "resume"):
                shutil.rmtree(done_with, ignore_errors=True)
            print(f"{v.name} L0={l0} seed={seed}: F1 {row['f1']:.4f} MCC {row['mcc']:.4f} uniq "
                  f"{row['uniqueness']:.4f} EV {row['explained_variance']:.4f} dead {row['dead']} "
                  f"(measured L0 {scores['l0_measured']:.1f}, {time.time() - t0:.0f} s)", flush=True)
    return rows


def _mean_spread(values: list[float], decimals: int = 3) -> str:
    mean, std, n = mean_std(values, exact=True)
    return fmt_mean_std(mean, std if n > 1 else None, decimals)


def write_markdown(csv_path: Path, md_path: Path, descriptions: dict[str, str], header: str,
                   footer: str = "") -> None:
    """The CSV as tables (mean ± standard deviation over seeds), one per protocol and L0, with the
    published SynthSAEBench-16k numbers beside the ``full`` protocol, then ``footer``; written to a
    temporary file and renamed into place."""
    rows = read_rows(csv_path)
    groups: dict[tuple[str, int], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["protocol"], int(r["l0"]))][r["sae"]].append(r)
    out = [header, ""]
    for (protocol, l0), saes in groups.items():
        table = []
        ranked = sorted(saes.items(), key=lambda kv: -statistics.mean(float(r["f1"]) for r in kv[1]))
        for name, rs in ranked:
            rs = sorted(rs, key=lambda r: int(r["seed"]))
            cols = [_mean_spread([float(r[c]) for r in rs]) for c in ("f1", "mcc", "uniqueness", "explained_variance")]
            table.append([name, rs[0]["source"], ",".join(r["seed"] for r in rs), *cols,
                          _mean_spread([float(r["dead"]) for r in rs], 0), descriptions.get(name, "")])
        if protocol.startswith("full"):
            for arch in ("Matryoshka", "BatchTopK"):
                pub = PUBLISHED.get((l0, arch))
                if pub:
                    table.append([f"published {arch}", "paper", 3] + [f"{pub[c]:.3f}" for c in
                                 ("f1", "mcc", "uniqueness", "explained_variance")] + ["", "SAELens docs"])
        out += [f"### {protocol}, L0 = {l0}", "",
                markdown_table(["SAE", "source", "seeds", "F1", "MCC", "uniqueness", "var. explained", "dead", "what"],
                               table), ""]
    with atomic_open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + footer)
