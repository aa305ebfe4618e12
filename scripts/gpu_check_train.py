"""A short trainSAE run for scripts/gpu_check.sh: MatryoshkaBatchTopK on sparse combinations of
fixed random directions, fp32 or bf16 (``trainSAE(autocast_dtype=...)``), then held-out FVU, L0,
tokens per second, and the dtype of the trained weights (master weights stay fp32).

    python scripts/gpu_check_train.py --device cuda --dtype bfloat16 --steps 300
    python scripts/gpu_check_train.py --device cpu --d 32 --dict-size 256 --k 4 --steps 30   # dry run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def stream(d: int, n_true: int, batch: int, device: str, seed: int):
    dirs = torch.nn.functional.normalize(torch.randn(n_true, d, generator=torch.Generator().manual_seed(1)), dim=1)
    gen = torch.Generator().manual_seed(seed)
    while True:
        on = (torch.rand(batch, n_true, generator=gen) < 8 / n_true).float()
        yield ((on * (0.5 + torch.rand(batch, n_true, generator=gen))) @ dirs).to(device)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--d", type=int, default=2304)
    p.add_argument("--dict-size", type=int, default=16384)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)

    from dictionary_learning.training import trainSAE

    from matryoshka_plugin import MatryoshkaBatchTopKSAE, MatryoshkaBatchTopKTrainer

    d, F, k = args.d, args.dict_size, args.k
    n_true = max(4 * k, F // 4)
    cfg = dict(trainer=MatryoshkaBatchTopKTrainer, steps=args.steps, activation_dim=d, dict_size=F, k=k, layer=0,
               lm_name="gpu-check", group_fractions=[1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32], lr=5e-4,
               warmup_steps=min(50, args.steps // 5), threshold_start_step=args.steps // 2, device=args.device, seed=0)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        trainSAE(data=stream(d, n_true, args.batch, args.device, 0), trainer_configs=[cfg], steps=args.steps,
                 save_dir=tmp, device=args.device, autocast_dtype=dtype, log_steps=None, verbose=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        ae = MatryoshkaBatchTopKSAE.from_pretrained(f"{tmp}/trainer_0/ae.pt", device=args.device)
    x = next(stream(d, n_true, 8192, args.device, 123))
    with torch.no_grad():
        f = ae.encode(x, use_threshold=True)
        xhat = ae.decode(f)
        fvu = float(((x - xhat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        l0 = float((f != 0).sum(1).float().mean())
    out = {"device": args.device, "dtype": args.dtype, "d": d, "F": F, "k": k, "B": args.batch, "steps": args.steps,
           "seconds": round(seconds, 2), "tokens_per_s": round(args.steps * args.batch / seconds),
           "held_out_fvu": round(fvu, 4), "held_out_l0": round(l0, 2),
           "weight_dtype": str(ae.W_enc.dtype)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
