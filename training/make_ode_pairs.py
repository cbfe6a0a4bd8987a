"""Teacher ODE pairs for DMD's regression loss: noise z, prompt ids, and the teacher's 50-step
DDIM + CFG output x0 (scaled latents) for them.

  /usr/bin/python3 -m training.make_ode_pairs --count 2048 --guidance 3 \
      --out training/checkpoints/ode_pairs.pt

Noise and prompts are drawn on the CPU, so --device cuda makes pairs for the same inputs.
"""

import argparse
import os
import time

import torch

from training import captions, common, t2i, train_teacher


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher", default="training/checkpoints/teacher.pt",
                   help="teacher checkpoint (train_teacher --out)")
    p.add_argument("--count", type=int, default=2048, help="number of pairs")
    p.add_argument("--steps", type=int, default=50, help="teacher DDIM steps")
    p.add_argument("--guidance", type=float, default=3.0, help="teacher CFG scale")
    p.add_argument("--batch-size", type=int, default=256, help="pairs per sampling batch")
    p.add_argument("--seed", type=int, default=1, help="seed of the noise and prompts")
    p.add_argument("--out", default="/tmp/ode_pairs.pt", help="output file (CPU tensors)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    common.add_device_argument(p)
    return p.parse_args(argv)


def main(args):
    torch.set_num_threads(args.threads)
    dev = common.device(args.device)
    text_encoder, unet = train_teacher.load_checkpoint(args.teacher)
    text_encoder.to(dev)
    unet.to(dev)
    gen = torch.Generator().manual_seed(args.seed)
    labels = torch.randint(10, (args.count,), generator=gen)
    phrasing = torch.randint(7, (args.count,), generator=gen)
    ids = captions.tokenize([captions.CAPTIONS[int(c)][int(p)] for c, p in zip(labels, phrasing)])
    noise = torch.randn((args.count, t2i.LATENT_CHANNELS, 8, 8), generator=gen)
    empty = captions.tokenize([""])[0].to(dev)
    schedule = t2i.Schedule(device=dev)
    out, start = [], time.time()
    for i in range(0, args.count, args.batch_size):
        out.append(common.sample(unet, text_encoder, ids[i:i + args.batch_size].to(dev),
                                 noise[i:i + args.batch_size].to(dev), args.steps, args.guidance,
                                 schedule, empty).cpu())
        done = min(args.count, i + args.batch_size)
        print(f"{done}/{args.count} pairs, {time.time() - start:.0f} s", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save({"noise": noise, "ids": ids, "labels": labels, "x0": torch.cat(out),
                "steps": args.steps, "guidance": args.guidance}, args.out)


if __name__ == "__main__":
    main(parse_args())
