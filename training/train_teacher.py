"""Trains the teacher: text encoder + latent UNet (training/t2i.py), epsilon prediction with SD's
scaled-linear schedule, 10% caption dropout for classifier-free guidance. From the repo root:

  /usr/bin/python3 -m training.train_teacher --steps 2400           # --out: the checkpoint

The text encoder is trained jointly with the UNet (SD keeps a pretrained CLIP frozen; we have none).
Every --save-every steps the full state (models, EMA, optimizer, step, curve) goes to --state;
--resume continues from it (batches depend only on --seed and the step). At the end it writes
--out: the EMA weights as float16 plus the token id table, and <out>.json: a summary with the
loss curve. --device cuda trains on a GPU (same batches and initial weights as on the CPU);
--stop-after-s saves the state and exits early so that a run fits a time-limited command.

A longer run from a finished teacher (how teacher_8400.pt was made from the 2400-step one):

  /usr/bin/python3 -m training.train_teacher --init training/checkpoints/teacher.pt \
      --steps 6000 --lr 5e-4 --warmup 100 --freeze-text-encoder \
      --out training/checkpoints/teacher_8400.pt

--init starts both the trained and the averaged weights from the checkpoint (its float16 EMA
weights) with fresh AdamW moments, so give it a --warmup; --steps counts this run's steps, the
checkpoint's "steps" is the total, and batches carry on the checkpoint's sequence (same --seed:
the batch of total step k is the one an uninterrupted run would have drawn). With
--freeze-text-encoder only the UNet trains: the text encoder, and so every embedding, stays
bit-identical to the --init one, and a DMD generator distilled from the --init teacher reads the
same embeddings as the new teacher (train_dmd --init ... --teacher NEW).
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F

from training import common, t2i


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=2400, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4, help="peak AdamW lr (warm-up, cosine)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the exported weights")
    p.add_argument("--channels", type=int, default=48, help="UNet base width")
    p.add_argument("--subset", type=int, default=0, help="first N training images (0 = all)")
    p.add_argument("--autoencoder", default=common.AUTOENCODER_CHECKPOINT)
    p.add_argument("--out", default="training/checkpoints/teacher.pt")
    p.add_argument("--state", default="/tmp/teacher_state.pt", help="resumable state path")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from --state if it exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--warmup", type=int, default=200,
                   help="steps of linear lr warm-up at the start of this run (at most --steps/10)")
    p.add_argument("--init", default="",
                   help="continue from this teacher checkpoint (--out of an earlier run): its "
                        "weights, width and token table; fresh optimizer moments")
    p.add_argument("--freeze-text-encoder", action="store_true",
                   help="train the UNet only; the text encoder keeps its initial weights")
    common.add_device_argument(p)
    common.add_stop_argument(p)
    return p.parse_args(argv)


def build(channels, token_ids):
    return t2i.TextEncoder(token_ids), t2i.UNet(channels)


def train(args):
    """Runs (or resumes) the training; returns the summary, or None if --stop-after-s stopped it
    before --steps (the state is saved)."""
    deadline = common.Deadline(args.stop_after_s)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = common.device(args.device)
    dataset = common.TrainingSet(args.subset, args.autoencoder, device=dev)
    schedule = t2i.Schedule(device=dev)
    init_steps, channels = 0, args.channels
    if args.init:
        init = common.load(args.init)
        init_steps, channels, token_ids = init["steps"], init["channels"], init["token_ids"]
        text_encoder, unet = modules_from_checkpoint(init)
        print(f"init from {args.init} ({init_steps} steps, width {channels})", flush=True)
    else:
        token_ids = t2i.known_token_ids()
        text_encoder, unet = build(channels, token_ids)
    text_encoder.to(dev)
    unet.to(dev)
    if args.freeze_text_encoder:
        text_encoder.eval().requires_grad_(False)
        params = list(unet.parameters())
    else:
        params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_text, ema_unet = common.Ema(text_encoder, args.ema), common.Ema(unet, args.ema)
    step, elapsed, curve, window = 0, 0.0, [], []
    if args.resume and os.path.exists(args.state):
        state = common.load(args.state)
        text_encoder.load_state_dict(state["text_encoder"])
        unet.load_state_dict(state["unet"])
        ema_text.module.load_state_dict(state["ema_text_encoder"])
        ema_unet.module.load_state_dict(state["ema_unet"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed, curve = state["step"], state["elapsed_s"], state["curve"]
        window = state.get("window", [])  # losses since the last curve point (older states: none)
        print(f"resumed from {args.state} at step {step}", flush=True)

    progress = common.Progress(args.steps, step, elapsed)
    while step < args.steps:
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + init_steps + step)
        x0, ids, _ = dataset.batch(args.batch_size, gen)
        t = torch.randint(t2i.NUM_TRAIN_TIMESTEPS, (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x0, ids, t, noise = x0.to(dev), ids.to(dev), t.to(dev), noise.to(dev)
        with torch.set_grad_enabled(not args.freeze_text_encoder):
            context = text_encoder(ids)
        pred = unet(schedule.add_noise(x0, noise, t), t, context)
        loss = F.mse_loss(pred, noise)
        for group in opt.param_groups:
            group["lr"] = common.lr_at(step, args.steps, args.lr, args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # Short warm-up of the average so that early checkpoints are usable (a run from --init
        # starts its average at the checkpoint's, so it needs none).
        decay = args.ema if args.init else min(args.ema, (1 + step) / (10 + step))
        if not args.freeze_text_encoder:  # e*d + e*(1-d) need not round back to e
            ema_text.update(text_encoder, decay)
        ema_unet.update(unet, decay)
        step += 1
        progress.tick()
        window.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            mean_loss = sum(window) / len(window)
            curve.append([step, mean_loss])
            window = []
            print(progress.line(step, loss=mean_loss), flush=True)
        stop = deadline.passed() and step < args.steps
        if step % args.save_every == 0 or step == args.steps or stop:
            common.save_state(args.state, {
                "text_encoder": text_encoder.state_dict(), "unet": unet.state_dict(),
                "ema_text_encoder": ema_text.module.state_dict(),
                "ema_unet": ema_unet.module.state_dict(), "optimizer": opt.state_dict(),
                "step": step, "elapsed_s": progress.elapsed(), "curve": curve,
                "window": window})
        if stop:
            print(deadline.stop_line(step, args.steps, args.state), flush=True)
            return None

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save({"text_encoder": common.half_state_dict(ema_text.module),
                "unet": common.half_state_dict(ema_unet.module), "token_ids": token_ids,
                "channels": channels, "latent_scaling_factor": dataset.scaling_factor,
                "steps": init_steps + step, "seed": args.seed}, args.out)
    # steps: the total; the curve's steps are this run's (init_steps places them after --init's).
    summary = {"steps": init_steps + step, "init": args.init, "init_steps": init_steps,
               "run_steps": step, "warmup": args.warmup,
               "freeze_text_encoder": args.freeze_text_encoder,
               "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema,
               "channels": channels, "subset": args.subset, "threads": args.threads,
               "device": args.device,
               "train_wall_s": round(progress.elapsed(), 1),
               "unet_parameters": t2i.count_parameters(unet),
               "text_encoder_parameters": t2i.count_parameters(text_encoder),
               "checkpoint_bytes": os.path.getsize(args.out), "loss_curve": curve}
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "loss_curve"}), flush=True)
    return summary


def modules_from_checkpoint(ckpt):
    """(text encoder, UNet) built from a loaded --out checkpoint dict: float32, on the CPU, in
    training mode as built."""
    text_encoder, unet = build(ckpt["channels"], ckpt["token_ids"])
    text_encoder.load_state_dict(common.float_state_dict(ckpt["text_encoder"]))
    unet.load_state_dict(common.float_state_dict(ckpt["unet"]))
    return text_encoder, unet


def load_checkpoint(path):
    """(text encoder, UNet) from a --out checkpoint, float32, eval mode, on the CPU."""
    text_encoder, unet = modules_from_checkpoint(common.load(path))
    return text_encoder.eval(), unet.eval()


if __name__ == "__main__":
    train(parse_args())
