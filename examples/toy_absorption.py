"""Feature absorption on the original Matryoshka post's toy tree, and how the prefix loss removes it.

Three parent features (p = 0.15), each with three mutually exclusive children (0.2 each when the
parent is on), and 8 singletons (p = 0.05), orthonormal in d = 20. A vanilla and a Matryoshka
log-sparsity SAE (20 latents each) train with trainSAE; absorption is, per parent, the share of
samples with the parent and a child on where the parent's latent does not fire.

    python examples/toy_absorption.py --steps 12000
"""
import argparse

import torch
from dictionary_learning.training import trainSAE

import matryoshka_plugin
from matryoshka_plugin import MatryoshkaLogSparsityTrainer

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--steps", type=int, default=12_000)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--save-dir", default="runs/toy_absorption")
args = p.parse_args()

D, PARENTS = 20, [0, 4, 8]  # features 0-11: parent i at PARENTS[i], its children at i+1..i+3; 12-19 singletons
gen = torch.Generator().manual_seed(args.seed)
directions = torch.linalg.qr(torch.randn(D, D, generator=gen))[0].T  # one orthonormal row per feature
magnitudes = 1 + 0.05 * torch.randn(D, 1, generator=gen)  # each feature's fixed norm


def sample(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    on = torch.zeros(batch, D)
    for parent in PARENTS:
        on[:, parent] = (torch.rand(batch, generator=gen) < 0.15).float()
        child = (torch.rand(batch, generator=gen) / 0.2).long()  # 0, 1, 2: that child; 3, 4: none
        for j in range(3):
            on[:, parent + 1 + j] = on[:, parent] * (child == j).float()
    on[:, 12:] = (torch.rand(batch, 8, generator=gen) < 0.05).float()
    return on, on @ (magnitudes * directions)


saes = {"vanilla": "none", "matryoshka": "pareto"}  # prefix_mode: none = plain log-sparsity SAE
trainSAE(
    data=(sample(200)[1] for _ in iter(int, 1)),
    trainer_configs=[dict(trainer=MatryoshkaLogSparsityTrainer, steps=args.steps, activation_dim=D, dict_size=D,
                          target_l0=1.2338, prefix_mode=mode, sparsity_coeff=0.2, lr=3e-2, seed=args.seed,
                          layer=0, lm_name="toy", device="cpu") for mode in saes.values()],
    steps=args.steps, save_dir=args.save_dir, device="cpu",
)

on, x = sample(20_000)
print("| SAE | absorption | per parent | L0 |\n|---|---|---|---|")
for i, name in enumerate(saes):
    ae, _ = matryoshka_plugin.load_dictionary(f"{args.save_dir}/trainer_{i}")
    with torch.no_grad():
        latents = ae.encode(x)
        decoder = ae.decode(torch.eye(D)) - ae.decode(torch.zeros(1, D))  # one decoder direction per latent
    cosine = torch.nn.functional.normalize(decoder, dim=1) @ directions.T  # [latent, feature]
    per_parent = []
    for parent in PARENTS:
        with_child = (on[:, parent] > 0) & (on[:, parent + 1 : parent + 4].sum(1) > 0)
        latent = cosine[:, parent].argmax()  # the latent that best matches the parent
        per_parent.append((latents[with_child, latent] <= 0).float().mean().item())
    l0 = (latents > 0).float().sum(1).mean().item()
    print(f"| {name} | {sum(per_parent) / 3:.3f} | {' '.join(f'{a:.3f}' for a in per_parent)} | {l0:.3f} |")
