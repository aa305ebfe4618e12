"""A small ``matryoshka_plugin.train`` run, started as its own process by the resume and
distributed tests (directly, or by torchrun).

    python tests/train_script.py OUT --set all|dp|dp-options|dp-reorder --steps 24 [--kill-at BATCH] [--resume]
        [--normalize] [--distributed trainers|data] [--batch 64] [--die-rank R --die-at STEP]
        [--save-steps 3,9] [--only 0,5] [--dump-ranks] [--grad-dump] [--grad-factor 2]
        [--timeout S] [--prepare-timeout S] [--slow-batch N --slow-seconds S] [--slow-publish S]
        [--sleep-rank R --sleep-at STEP --sleep-seconds S] [--data-config] [--stale-listing-rank R]

``--kill-at`` sends SIGKILL to this process when the data source is asked for that batch (so at
a step chosen by the caller); ``--die-rank``/``--die-at`` make one rank exit abruptly;
``--only`` keeps some of the set's trainer configs; ``--dump-ranks`` writes every trainer's full
state as this rank holds it at the end to ``OUT/rank_<r>.pt``; ``--grad-dump`` records the
gradients every trainer clips (averaged over the ranks, before clipping and the optimiser) at
every step to ``OUT/grads_<r>.pt``; ``--grad-factor`` multiplies the data-parallel average by a
factor (a deliberately wrong averaging, which the gradient test must catch). ``--slow-batch``
makes the data take ``--slow-seconds`` to produce that batch and ``--slow-publish`` makes rank 0
take that long to publish each checkpoint (rank 0's one-off work); ``--sleep-rank``/``--sleep-at``
make one rank hang in a training step; ``--data-config`` gives the data a ``config`` (as
dictionary_learning's ActivationBuffer has) on rank 0 and ``data=None`` on the other ranks;
``--stale-listing-rank`` hides the newest checkpoint from that rank's listing of ``resume/`` (a
shared file system that shows it late).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch

D, N = 16, 32
PREFIX_MODES = ("groups", "every", "pareto", "pareto_expected", "none")


def trainer_configs(which: str, steps: int) -> list[dict]:
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer

    from matryoshka_plugin import MatryoshkaBatchTopKTrainer, MatryoshkaLogSparsityTrainer

    common = dict(steps=steps, activation_dim=D, dict_size=N, device="cpu", layer=0, lm_name="tiny")
    fractions = [0.25, 0.25, 0.5]
    out = []
    for i, mode in enumerate(PREFIX_MODES):
        out.append(dict(trainer=MatryoshkaBatchTopKTrainer, **common, k=4, prefix_mode=mode, seed=10 + i,
                        group_fractions=fractions if mode == "groups" else None, warmup_steps=3,
                        threshold_start_step=4, dead_feature_threshold=256, n_prefixes=4))
    if which == "dp-options":  # the MatryoshkaBatchTopKTrainer options, data-parallel
        opts = [dict(matryoshka_aux_loss=True, detach_inner_levels=True, k_anneal_steps=6), dict(k_anneal_steps=3),
                dict(reorder_by="frequency"), dict(reorder_by="contribution", reorder_decay=0.9)]
        return [dict(trainer=MatryoshkaBatchTopKTrainer, **common, k=4, seed=40 + i, group_fractions=fractions,
                     warmup_steps=3, threshold_start_step=4, dead_feature_threshold=128, **o)
                for i, o in enumerate(opts)]
    for i, mode in enumerate(PREFIX_MODES):
        # a short dead-latent threshold, so latents are resampled (and resampling is resumed)
        out.append(dict(trainer=MatryoshkaLogSparsityTrainer, **common, target_l0=4, prefix_mode=mode, seed=20 + i,
                        group_fractions=fractions if mode == "groups" else None, warmup_steps=3,
                        dead_feature_threshold=64, n_prefixes=4))
    if which == "dp":  # the trainers that can train one SAE over several processes
        return out
    # dictionary_learning's own trainer, resumed as far as its state can be reached
    out.append(dict(trainer=BatchTopKTrainer, dict_class=BatchTopKSAE, **common, k=4, seed=30, warmup_steps=3,
                    threshold_start_step=4))
    return out


DATA_CONFIG = {"d_submodule": D, "io": "in", "n_ctxs": 8, "ctx_len": 16, "refresh_batch_size": 4,
               "out_batch_size": 64, "device": "cpu"}


class ConfiguredBatches:
    """An iterator over ``batches`` with an ActivationBuffer-like ``config``."""

    config = DATA_CONFIG

    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.it)


def batches(kill_at: int, batch: int, slow_at: int = -1, slow_seconds: float = 0.0):
    for i in range(10**9):
        if i == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if i == slow_at:
            time.sleep(slow_seconds)
        g = torch.Generator().manual_seed(i)
        # a few latent directions so the SAEs have something to learn, plus noise
        yield torch.randn(batch, D, generator=g) * 0.3 + (torch.rand(batch, 4, generator=g) < 0.3).float() @ \
            torch.randn(4, D, generator=torch.Generator().manual_seed(99)) * 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--set", default="all", choices=["all", "dp", "dp-options"])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--kill-at", type=int, default=-1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--normalize", action="store_true")
    p.add_argument("--distributed", default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--die-rank", type=int, default=None)
    p.add_argument("--die-at", type=int, default=None)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--warm-up-run", action="store_true", help="a 6-step train() first, in the same process")
    p.add_argument("--save-steps", default=None, help="comma-separated steps for save_steps")
    p.add_argument("--only", default=None, help="comma-separated indices of the set's configs to train")
    p.add_argument("--dump-ranks", action="store_true")
    p.add_argument("--grad-dump", action="store_true")
    p.add_argument("--grad-factor", type=float, default=None)
    p.add_argument("--prepare-timeout", type=float, default=24 * 3600)
    p.add_argument("--startup-timeout", type=float, default=120)
    p.add_argument("--slow-batch", type=int, default=-1)
    p.add_argument("--slow-seconds", type=float, default=0.0)
    p.add_argument("--slow-publish", type=float, default=0.0)
    p.add_argument("--sleep-rank", type=int, default=None)
    p.add_argument("--sleep-at", type=int, default=None)
    p.add_argument("--sleep-seconds", type=float, default=0.0)
    p.add_argument("--data-config", action="store_true")
    p.add_argument("--stale-listing-rank", type=int, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    from matryoshka_plugin import train

    configs = trainer_configs(a.set, a.steps)
    if a.only is not None:
        configs = [configs[int(i)] for i in a.only.split(",")]
    save_steps = [int(s) for s in a.save_steps.split(",")] if a.save_steps else None
    rank = int(os.environ.get("RANK", "0"))
    if a.die_rank is not None or a.sleep_rank is not None:
        import matryoshka_plugin.trainers.matryoshka_batch_top_k as btk

        update = btk.MatryoshkaBatchTopKTrainer.update

        def dying_update(self, step, x):
            if rank == a.die_rank and step == a.die_at:
                os._exit(3)
            if rank == a.sleep_rank and step == a.sleep_at:
                time.sleep(a.sleep_seconds)
            return update(self, step, x)

        btk.MatryoshkaBatchTopKTrainer.update = dying_update
    grads: list[list[torch.Tensor]] = []
    if a.grad_dump:
        import matryoshka_plugin.trainers.matryoshka_batch_top_k as btk
        import matryoshka_plugin.trainers.matryoshka_log_sparsity as ls

        clip = btk.clip_grad_norm_

        def recording_clip(params, max_norm):
            params = list(params)
            grads.append([p.grad.detach().clone() for p in params])
            return clip(params, max_norm)

        btk.clip_grad_norm_ = ls.clip_grad_norm_ = recording_clip
    if a.grad_factor is not None:
        from matryoshka_plugin.distributed import ProcessGroupCollective

        average = ProcessGroupCollective.average_gradients_

        def wrong_average(self, params):
            params = list(params)
            average(self, params)
            for p in params:
                p.grad.mul_(a.grad_factor)

        ProcessGroupCollective.average_gradients_ = wrong_average
    if a.stale_listing_rank == rank:
        from matryoshka_plugin.resume import RunCheckpoints

        complete = RunCheckpoints.complete
        RunCheckpoints.complete = lambda self: complete(self)[1:]
    if a.slow_publish:
        from matryoshka_plugin.resume import RunCheckpoints

        publish = RunCheckpoints.publish

        def slow_publish(self, *args, **kwargs):
            time.sleep(a.slow_publish)
            return publish(self, *args, **kwargs)

        RunCheckpoints.publish = slow_publish
    data = batches(a.kill_at, a.batch, a.slow_batch, a.slow_seconds)
    if a.data_config:
        data = ConfiguredBatches(data) if rank == 0 else None
    if a.warm_up_run:  # a second train() in one process must reuse the process group
        train(batches(-1, a.batch), trainer_configs(a.set, 6), 6, save_dir=a.out + "_warm_up", device="cpu",
              distributed=a.distributed, progress=False)
    trainers = train(data, configs, a.steps, save_dir=a.out, save_steps=save_steps,
                     normalize_activations=a.normalize, device="cpu", checkpoint_every=a.checkpoint_every,
                     resume=a.resume, distributed=a.distributed, progress=False, timeout_s=a.timeout,
                     prepare_timeout_s=a.prepare_timeout, startup_timeout_s=a.startup_timeout)
    if a.grad_dump:
        torch.save(grads, os.path.join(a.out, f"grads_{int(os.environ.get('RANK', '0'))}.pt"))
    if a.dump_ranks:
        from matryoshka_plugin.resume import trainer_state_dict

        rank = int(os.environ.get("RANK", "0"))
        torch.save([trainer_state_dict(t) for t in trainers], os.path.join(a.out, f"rank_{rank}.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
