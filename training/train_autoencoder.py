"""Trains the Fashion-MNIST autoencoder (training/autoencoder.py). From the repository root:

  /usr/bin/python3 -m training.train_autoencoder --steps 1800    # --out defaults to the checkpoint

Every --save-every steps the full training state (model, optimizer, step) goes to --state; rerun
with --resume to continue from it (the batch order and sampling noise depend only on --seed and
the step, so a resumed run follows the same trajectory). At the end it writes:
  --out            weights only, stored as float16 (< 2 MB), plus config and latent scaling factor;
  <out>.json       summary (same path, .json extension): test reconstruction MSE / PSNR
                   (measured with the float16 weights), latent scaling factor, wall time, steps.
"""

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from training import autoencoder as ae
from training import common, data
from training.autoencoder import load_checkpoint  # noqa: F401  (this stage's reader of --out)

KL_WEIGHT = 1e-6  # per latent element of the summed KL, relative to a summed-per-pixel MSE (SD)
SCALING_SUBSET = 10000  # training images used for the latent scaling factor


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=1800, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam lr (cosine decay to 0)")
    p.add_argument("--subset", type=int, default=0,
                   help="use the first N train and test images (0 = all)")
    p.add_argument("--out", default="training/checkpoints/autoencoder.pt")
    p.add_argument("--state", default="/tmp/autoencoder_state.pt", help="resumable state path")
    p.add_argument("--save-every", type=int, default=200, help="steps between state saves")
    p.add_argument("--resume", action="store_true", help="continue from --state if it exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return p.parse_args(argv)


def lr_at(step, steps, peak):
    """Linear warm-up over min(100, steps // 10) steps, then cosine decay to 0. Not common.lr_at:
    this rounds pi * (step - warmup) / n differently (last-bit differences in the lr), and the
    committed autoencoder was trained with it."""
    warmup = min(100, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_step(model, opt, images, step, args):
    """One optimisation step; returns (loss, recon mse, kl) as floats."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    idx = torch.randint(len(images), (args.batch_size,), generator=gen)
    x = images[idx]
    recon, mean, logvar = model(x, sample=True, generator=gen)
    mse = F.mse_loss(recon, x)
    kl = ae.kl_divergence(mean, logvar)
    loss = mse + KL_WEIGHT * kl / x[0].numel()
    for group in opt.param_groups:
        group["lr"] = lr_at(step, args.steps, args.lr)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item(), mse.item(), kl.item()


def half_roundtrip(model):
    """Copy of `model` whose weights went through float16 (what --out stores)."""
    rounded = ae.AutoencoderKL()
    rounded.load_state_dict(common.float_state_dict(common.half_state_dict(model)))
    return rounded.eval()


def train(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_images, _ = data.load_split("train", args.subset)
    test_images, _ = data.load_split("test", args.subset)
    model = ae.AutoencoderKL()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    step, elapsed = 0, 0.0
    if args.resume and os.path.exists(args.state):
        state = common.load(args.state)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed_s"]
        print(f"resumed from {args.state} at step {step}", flush=True)

    model.train()
    start, window_start, window_steps = time.time() - elapsed, time.time(), 0
    while step < args.steps:
        loss, mse, kl = train_step(model, opt, train_images, step, args)
        step += 1
        window_steps += 1
        if step % args.log_every == 0 or step == args.steps:
            rate = window_steps / (time.time() - window_start)
            print(f"step {step}/{args.steps} loss {loss:.5f} recon_mse {mse:.5f} kl {kl:.1f} "
                  f"psnr {ae.psnr(mse):.2f} dB {rate:.2f} steps/s", flush=True)
            window_start, window_steps = time.time(), 0
        if step % args.save_every == 0 or step == args.steps:
            common.save_state(args.state, {"model": model.state_dict(),
                                           "optimizer": opt.state_dict(), "step": step,
                                           "elapsed_s": time.time() - start})
    train_s = time.time() - start

    final = half_roundtrip(model)
    test_mse = ae.reconstruction_mse(final, test_images)
    scale = ae.latent_scaling_factor(final, train_images[:SCALING_SUBSET])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save({"model": common.half_state_dict(model),
                "latent_scaling_factor": scale, "latent_shape": [ae.LATENT_CHANNELS, 8, 8],
                "steps": step, "seed": args.seed}, args.out)
    summary = {"steps": step, "batch_size": args.batch_size, "subset": args.subset,
               "train_wall_s": round(train_s, 1), "threads": args.threads,
               "test_images": len(test_images), "test_recon_mse": test_mse,
               "test_psnr_db": ae.psnr(test_mse), "latent_scaling_factor": scale,
               "checkpoint_bytes": os.path.getsize(args.out)}
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    train(parse_args())
