"""Feature absorption on the original Matryoshka post's toy tree, and how the prefix loss removes it.

Three parent features, each with three mutually exclusive children, and singletons, orthonormal
in d = 20 (``matryoshka_plugin.toy.ToyModel.post_tree``). A vanilla and a Matryoshka log-sparsity
SAE (20 latents each) train with trainSAE; absorption is, per parent, the share of samples with
the parent and a child on where the parent's matched latent does not fire.

    python examples/toy_absorption.py --steps 12000
"""
import argparse

from dictionary_learning.training import trainSAE

import matryoshka_plugin
from matryoshka_plugin import MatryoshkaLogSparsityTrainer
from matryoshka_plugin.threads import cpu_threads, threads_for
from matryoshka_plugin.toy import ToyModel, evaluate_sae

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--steps", type=int, default=12_000)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--save-dir", default="runs/toy_absorption")
args = p.parse_args()

toy = ToyModel.post_tree(d=20, seed=args.seed)
saes = {"vanilla": "none", "matryoshka": "pareto"}  # prefix_mode: none = plain log-sparsity SAE
# The demo's thread rule (matryoshka_plugin.threads): toy shapes, data generation and evaluation
# included, run faster on one thread, many times faster on a busy machine.
with cpu_threads(threads_for(200 * 20 * 20)):
    trainSAE(
        data=toy.batches(200, seed=args.seed),
        trainer_configs=[dict(trainer=MatryoshkaLogSparsityTrainer, steps=args.steps, activation_dim=20, dict_size=20,
                              target_l0=1.2338, prefix_mode=mode, sparsity_coeff=0.2, lr=3e-2, seed=args.seed,
                              layer=0, lm_name="toy", device="cpu") for mode in saes.values()],
        steps=args.steps, save_dir=args.save_dir, device="cpu",
    )

    print("| SAE | absorption | per parent | L0 |\n|---|---|---|---|")
    for i, name in enumerate(saes):
        ae, _ = matryoshka_plugin.load_dictionary(f"{args.save_dir}/trainer_{i}")
        m = evaluate_sae(ae, toy, n_samples=20_000)
        print(f"| {name} | {m.absorption:.3f} | {' '.join(f'{a:.3f}' for a in m.absorption_per_parent)} | {m.l0:.3f} |")
