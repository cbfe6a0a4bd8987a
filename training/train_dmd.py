"""Distills the teacher into a one-step generator with Distribution Matching Distillation.

  /usr/bin/python3 -m training.train_dmd --steps 600 --fake-steps 4       # DMD2-style TTUR
  /usr/bin/python3 -m training.train_dmd --steps 600 --fake-steps 1 --reg-weight 0.25 \
      --pairs training/checkpoints/ode_pairs.pt                            # DMD-style regression

Recipe (DMD2's SD1.5 one-step, at our scale):
- generator G: a copy of the teacher UNet, run at t = 999 on pure noise z; its epsilon gives
  x0 = (z - sqrt(1 - a_999) eps) / sqrt(a_999).
- real score: the frozen teacher with classifier-free guidance (--guidance) on x_t = noised x0,
  t uniform in [20, 980]; fake score: another copy of the teacher, trained online with the
  denoising loss on G's (detached) outputs, --fake-steps updates per generator update (two
  time-scale update rule).
- DMD gradient (x0_fake - x0_real) / mean|x0 - x0_real| (per image), applied through
  0.5 * mse(x0, stopgrad(x0 - grad)).
- optional regression loss (--reg-weight): mse between G(z) and the teacher's 50-step DDIM+CFG
  output for the same z and prompt (training/make_ode_pairs.py; several files with different
  seeds concatenate), as in the first DMD paper; --heldout-pairs logs the same loss on pairs G
  never trains on, so over-fitting to a small pair set shows in the evaluations.
- optional GAN head (--gan-weight, DMD2): a small classifier on the fake score's bottleneck
  tells noised real training latents from noised G outputs (same t range, prompts of their
  class). The fake score and the head learn it with weight --gan-fake-weight beside their
  denoising loss; G gets the non-saturating loss softplus(-logit) through the (frozen) fake
  score with weight --gan-weight. In DMD2 real data is what lets a student beat its teacher;
  here, from the 6000-step state, it did not help (docs/FASHION.md, ablation).
The text encoder is the teacher's, frozen. Every --eval-every steps a quick in-process evaluation
(FID of classifier features, class accuracy, diversity, mean pixel) is logged; resumable as the
other stages. --out gets G's weights as float16 (EMA if --ema > 0) with the text encoder.
--device cuda trains on a GPU (random numbers still drawn on the CPU); --stop-after-s saves the
state and exits early so that a run fits a time-limited command.
"""

import argparse
import copy
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from training import common, t2i, train_teacher
from training.quick_eval import QuickEval


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher", default="training/checkpoints/teacher.pt")
    p.add_argument("--autoencoder", default=common.AUTOENCODER_CHECKPOINT)
    p.add_argument("--steps", type=int, default=600, help="generator updates")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--fake-steps", type=int, default=4, help="fake-score updates per G update")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW lr of G and the fake score")
    p.add_argument("--warmup", type=int, default=0,
                   help="generator steps of linear lr warm-up (0 = none); for --init, whose "
                        "optimizers start without moments, so Adam's first steps are full-size")
    p.add_argument("--beta1", type=float, default=0.9,
                   help="Adam beta1 of both optimizers (DMD2 uses 0 with its GAN head)")
    p.add_argument("--guidance", type=float, default=3.0, help="real score CFG scale")
    p.add_argument("--min-t", type=int, default=20)
    p.add_argument("--max-t", type=int, default=980)
    p.add_argument("--reg-weight", type=float, default=0.0, help="regression loss weight")
    p.add_argument("--pairs", default="",
                   help="ODE pairs file(s) (make_ode_pairs.py), comma-separated: concatenated; "
                        "they must share the teacher's steps and guidance and not repeat noise")
    p.add_argument("--heldout-pairs", default="",
                   help="ODE pairs file(s) never trained on: each evaluation also logs G's "
                        "regression loss on them (reg_heldout), to see over-fitting to --pairs")
    p.add_argument("--gan-weight", type=float, default=0.0,
                   help="G's GAN loss weight (0 = no GAN head)")
    p.add_argument("--gan-fake-weight", type=float, default=0.01,
                   help="weight of the real/fake classification loss of the fake score + head")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of exported G (0 = off)")
    p.add_argument("--subset", type=int, default=0, help="first N training images (0 = all)")
    p.add_argument("--init", default="",
                   help="start G and the fake score from a previous --out checkpoint (continue "
                        "a run on another machine; the optimizer state starts fresh)")
    p.add_argument("--out", default="training/checkpoints/dmd.pt")
    p.add_argument("--state", default="/tmp/dmd_state.pt")
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--eval-every", type=int, default=50, help="quick evaluation period (0 = off)")
    p.add_argument("--eval-per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    common.add_device_argument(p)
    common.add_stop_argument(p)
    return p.parse_args(argv)


GAN_SEED_OFFSET = 1 << 40


def check_disjoint(a, b, name_a, name_b):
    """SystemExit if two pair sets share a noise sample (the same seed made both)."""
    shared = set(map(tuple, a["noise"].flatten(1)[:, :8].tolist())) & set(
        map(tuple, b["noise"].flatten(1)[:, :8].tolist()))
    if shared:
        raise SystemExit(f"{name_a} and {name_b} share {len(shared)} noise samples: make the "
                         f"pair files with different --seed values")


def load_pairs(paths):
    """The ODE pairs of comma-separated files, concatenated ({noise, ids, labels, x0, steps,
    guidance}, CPU tensors). SystemExit if the files were made with different teacher steps or
    guidance, or repeat each other's noise."""
    sets = []
    for path in [p for p in paths.split(",") if p]:
        pairs = common.load(path)
        for previous_path, previous in sets:
            for key in ("steps", "guidance"):
                if pairs[key] != previous[key]:
                    raise SystemExit(f"pairs {path} have {key} {pairs[key]}, {previous_path} "
                                     f"{previous[key]}: regression targets must come from one "
                                     f"teacher sampler")
            check_disjoint(previous, pairs, previous_path, path)
        sets.append((path, pairs))
    if not sets:
        raise SystemExit(f"--pairs {paths!r} names no file")
    first = sets[0][1]
    out = {key: torch.cat([s[key] for _, s in sets]) for key in ("noise", "ids", "labels", "x0")}
    out.update(steps=first["steps"], guidance=first["guidance"])
    return out


class GanHead(nn.Module):
    """DMD2's classification branch: bottleneck float[B, 2 * ch, 4, 4] of the fake score ->
    real/fake logit float[B]."""

    def __init__(self, ch):
        super().__init__()
        self.net = nn.Sequential(
            nn.GroupNorm(16, 2 * ch), nn.SiLU(), nn.Conv2d(2 * ch, 2 * ch, 3, padding=1),
            nn.GroupNorm(16, 2 * ch), nn.SiLU(), nn.Conv2d(2 * ch, 1, 4))

    def forward(self, bottleneck):
        return self.net(bottleneck).flatten()


class Distiller:
    def __init__(self, args):
        self.args = args
        self.device = common.device(args.device)
        self.text_encoder, self.teacher = train_teacher.load_checkpoint(args.teacher)
        self.text_encoder.to(self.device).requires_grad_(False)
        self.teacher.to(self.device).requires_grad_(False)
        self.generator = copy.deepcopy(self.teacher).train().requires_grad_(True)
        self.fake = copy.deepcopy(self.teacher).train().requires_grad_(True)
        self.head = GanHead(self.teacher.ch).to(self.device) if args.gan_weight > 0 else None
        self.init_steps = 0  # generator steps behind --init's checkpoint
        if args.init:
            init = common.load(args.init)
            self.init_steps = int(init.get("steps", 0))
            self.generator.load_state_dict(common.float_state_dict(init["unet"]))
            self.fake.load_state_dict(common.float_state_dict(init["fake"]))
            if self.head is not None and "gan_head" in init:
                self.head.load_state_dict(common.float_state_dict(init["gan_head"]))
        betas = (args.beta1, 0.999)
        # The head has its own optimizer so that states written without it still load.
        self.opt_d = (torch.optim.AdamW(self.head.parameters(), lr=args.lr, betas=betas,
                                        weight_decay=0.01) if self.head is not None else None)
        self.opt_g = torch.optim.AdamW(self.generator.parameters(), lr=args.lr, betas=betas,
                                       weight_decay=0.01)
        self.opt_f = torch.optim.AdamW(self.fake.parameters(), lr=args.lr, betas=betas,
                                       weight_decay=0.01)
        self.ema = common.Ema(self.generator, args.ema) if args.ema > 0 else None
        self.schedule = t2i.Schedule(device=self.device)
        self.a999 = self.schedule.alphas_cumprod[999]
        self.pairs = load_pairs(args.pairs) if args.pairs else None  # indexed on the CPU
        self.heldout = load_pairs(args.heldout_pairs) if args.heldout_pairs else None
        if self.pairs is not None and self.heldout is not None:
            check_disjoint(self.pairs, self.heldout, "--pairs", "--heldout-pairs")
        if args.reg_weight > 0 and self.pairs is None:
            raise SystemExit("--reg-weight needs --pairs")

    def generate(self, z, emb, generator=None):
        """One-step G (default: the trained one): x0 from its epsilon at t = 999 (what the server
        computes)."""
        t = torch.full((len(z),), 999, dtype=torch.int64, device=z.device)
        eps = (self.generator if generator is None else generator)(z, t, emb)
        return (z - (1 - self.a999).sqrt() * eps) / self.a999.sqrt()

    def logit(self, xt, t, emb):
        """The GAN head's real/fake logit of noised latents xt."""
        return self.head(self.fake.encode(xt, t, emb)[3])

    def real_x0(self, xt, t, emb, uncond):
        eps_u, eps_c = self.teacher(torch.cat([xt, xt]), torch.cat([t, t]),
                                    torch.cat([uncond, emb])).chunk(2)
        eps = eps_u + (eps_c - eps_u) * self.args.guidance
        return self.schedule.x0_from_eps(xt, eps, t)

    def step(self, dataset, step):
        a, dev = self.args, self.device
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
        empty = dataset.empty_ids[None].to(dev)
        with torch.no_grad():
            uncond = self.text_encoder(empty).expand(a.batch_size, -1, -1)
        # Fake-score updates on fresh generator samples (denoising loss).
        # The GAN's real batches and noise come from their own stream, so that turning the head
        # on leaves every other draw of the step as it was.
        gan_gen = torch.Generator().manual_seed(GAN_SEED_OFFSET + a.seed * 1_000_003 + step)
        fake_loss = d_loss = d_real = d_fake = 0.0
        for _ in range(a.fake_steps):
            _, ids, _ = dataset.batch(a.batch_size, gen, dropout=0.0)
            with torch.no_grad():
                emb = self.text_encoder(ids.to(dev))
                z = torch.randn((a.batch_size, 4, 8, 8), generator=gen).to(dev)
                x0 = self.generate(z, emb)
            t = torch.randint(t2i.NUM_TRAIN_TIMESTEPS, (a.batch_size,), generator=gen).to(dev)
            noise = torch.randn(x0.shape, generator=gen).to(dev)
            loss_f = F.mse_loss(self.fake(self.schedule.add_noise(x0, noise, t), t, emb), noise)
            if self.head is not None:
                loss_d, real_logit, fake_logit = self.discriminator_loss(dataset, gan_gen, x0, emb)
                loss_f = loss_f + a.gan_fake_weight * loss_d
                self.opt_d.zero_grad(set_to_none=True)
                d_loss += loss_d.item() / a.fake_steps
                d_real += real_logit / a.fake_steps
                d_fake += fake_logit / a.fake_steps
            self.opt_f.zero_grad(set_to_none=True)
            loss_f.backward()
            torch.nn.utils.clip_grad_norm_(self.fake.parameters(), 1.0)
            self.opt_f.step()
            if self.head is not None:
                torch.nn.utils.clip_grad_norm_(self.head.parameters(), 1.0)
                self.opt_d.step()
            fake_loss += loss_f.item() / a.fake_steps
        # Generator update: distribution matching gradient (+ regression).
        _, ids, _ = dataset.batch(a.batch_size, gen, dropout=0.0)
        with torch.no_grad():
            emb = self.text_encoder(ids.to(dev))
        x0 = self.generate(torch.randn((a.batch_size, 4, 8, 8), generator=gen).to(dev), emb)
        t = torch.randint(a.min_t, a.max_t + 1, (a.batch_size,), generator=gen).to(dev)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        with torch.no_grad():
            xt = self.schedule.add_noise(x0.detach(), noise, t)
            x0_real = self.real_x0(xt, t, emb, uncond)
            x0_fake = self.schedule.x0_from_eps(xt, self.fake(xt, t, emb), t)
            weight = (x0.detach() - x0_real).abs().mean(dim=[1, 2, 3], keepdim=True)
            grad = torch.nan_to_num((x0_fake - x0_real) / weight)
        loss_dmd = 0.5 * F.mse_loss(x0, (x0 - grad).detach())
        loss = loss_dmd
        loss_reg = torch.zeros((), device=dev)
        if a.reg_weight > 0:
            idx = torch.randint(len(self.pairs["noise"]), (a.batch_size,), generator=gen)
            with torch.no_grad():
                pair_emb = self.text_encoder(self.pairs["ids"][idx].to(dev))
            pred = self.generate(self.pairs["noise"][idx].to(dev), pair_emb)
            loss_reg = F.mse_loss(pred, self.pairs["x0"][idx].to(dev))
            loss = loss + a.reg_weight * loss_reg
        loss_gan = torch.zeros((), device=dev)
        if self.head is not None:
            # Gradients reach x0 through the fake score and the head, not their weights.
            self.fake.requires_grad_(False)
            self.head.requires_grad_(False)
            loss_gan = F.softplus(-self.logit(self.schedule.add_noise(x0, noise, t), t, emb)).mean()
            self.fake.requires_grad_(True)
            self.head.requires_grad_(True)
            loss = loss + a.gan_weight * loss_gan
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.generator.parameters(), 1.0)
        self.opt_g.step()
        if self.ema is not None:
            self.ema.update(self.generator)
        metrics = {"dmd": loss_dmd.item(), "reg": loss_reg.item(), "fake": fake_loss,
                   "x0_std": x0.detach().std().item(), "x0_mean": x0.detach().mean().item()}
        if self.head is not None:
            metrics.update({"gan_g": loss_gan.item(), "gan_d": d_loss, "logit_real": d_real,
                            "logit_fake": d_fake})
        return metrics

    def discriminator_loss(self, dataset, gen, x0_fake, emb_fake):
        """Real/fake classification loss of the fake score + head on noised real latents (with
        captions of their class) and noised G outputs x0_fake; also the mean logits."""
        a, dev = self.args, self.device
        x0_real, ids, _ = dataset.batch(a.batch_size, gen, dropout=0.0)
        with torch.no_grad():
            emb_real = self.text_encoder(ids.to(dev))
        t = torch.randint(a.min_t, a.max_t + 1, (2 * a.batch_size,), generator=gen).to(dev)
        noise = torch.randn((2 * a.batch_size,) + tuple(x0_fake.shape[1:]), generator=gen).to(dev)
        xt = self.schedule.add_noise(torch.cat([x0_real.to(dev), x0_fake]), noise, t)
        real, fake = self.logit(xt, t, torch.cat([emb_real, emb_fake])).chunk(2)
        loss = F.softplus(-real).mean() + F.softplus(fake).mean()
        return loss, real.mean().item(), fake.mean().item()

    def set_lr(self, lr):
        """Sets the lr (and --beta1) of every optimizer."""
        for opt in (self.opt_g, self.opt_f, self.opt_d):
            for group in (opt.param_groups if opt is not None else []):
                group["lr"], group["betas"] = lr, (self.args.beta1, 0.999)

    def exported(self):
        return self.ema.module if self.ema is not None else self.generator

    @torch.no_grad()
    def heldout_loss(self, batch_size=256):
        """Regression loss (mse) of the exported G on the held-out pairs (in the mode it is in:
        evaluate() calls it with the evaluation's eval mode)."""
        total = 0.0
        for i in range(0, len(self.heldout["noise"]), batch_size):
            emb = self.text_encoder(self.heldout["ids"][i:i + batch_size].to(self.device))
            x0 = self.generate(self.heldout["noise"][i:i + batch_size].to(self.device), emb,
                               self.exported())
            total += F.mse_loss(x0, self.heldout["x0"][i:i + batch_size].to(self.device),
                                reduction="sum").item()
        return total / self.heldout["x0"].numel()


def train(args):
    """Runs (or resumes) the distillation; returns the summary, or None if --stop-after-s stopped
    it before --steps (the state is saved)."""
    deadline = common.Deadline(args.stop_after_s)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dataset = common.TrainingSet(args.subset, args.autoencoder, device=common.device(args.device))
    d = Distiller(args)
    evaluator = None
    if args.eval_every:
        evaluator = QuickEval(dataset.decoder, dataset.scaling_factor, args.eval_per_class,
                              subset_test=args.subset, device=d.device)
    step, elapsed, curve, evals, window = 0, 0.0, [], [], []
    if args.resume and os.path.exists(args.state):
        state = common.load(args.state)
        d.generator.load_state_dict(state["generator"])
        d.fake.load_state_dict(state["fake"])
        d.opt_g.load_state_dict(state["opt_g"])
        d.opt_f.load_state_dict(state["opt_f"])
        if d.head is not None and "head" in state:  # a run that adds the head starts it fresh
            d.head.load_state_dict(state["head"])
            d.opt_d.load_state_dict(state["opt_d"])
        # Optimizer states carry their lr and betas; the flags of the resuming run win, like
        # every other flag (a continuation may change the recipe).
        d.set_lr(args.lr)
        if d.ema is not None:
            # A run that turns --ema on when resuming starts its average at the loaded G.
            d.ema.module.load_state_dict(state.get("ema", state["generator"]))
        step, elapsed, curve, evals = (state["step"], state["elapsed_s"], state["curve"],
                                       state["evals"])
        window = state.get("window", [])  # metrics since the last curve point (older states: none)
        print(f"resumed from {args.state} at step {step}", flush=True)

    def evaluate(step):
        if evaluator is None:
            return
        d.exported().eval()
        result = evaluator.evaluate(d.exported(), d.text_encoder, steps=1, guidance=1.0)
        if d.heldout is not None:
            result["reg_heldout"] = d.heldout_loss()
        d.generator.train()
        result["step"] = step
        evals.append(result)
        print("eval " + json.dumps(result), flush=True)

    if step == 0:
        evaluate(0)
    progress = common.Progress(args.steps, step, elapsed)
    while step < args.steps:
        if step < args.warmup:  # the last warm-up step sets args.lr itself
            d.set_lr(args.lr * (step + 1) / args.warmup)
        window.append(d.step(dataset, step))
        step += 1
        progress.tick()
        if step % args.log_every == 0 or step == args.steps:
            mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            curve.append([step, mean])
            window = []
            print(progress.line(step, **mean), flush=True)
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            evaluate(step)
        stop = deadline.passed() and step < args.steps
        if step % args.save_every == 0 or step == args.steps or stop:
            state = {"generator": d.generator.state_dict(), "fake": d.fake.state_dict(),
                     "opt_g": d.opt_g.state_dict(), "opt_f": d.opt_f.state_dict(),
                     "step": step, "elapsed_s": progress.elapsed(), "curve": curve,
                     "evals": evals, "window": window}
            if d.ema is not None:
                state["ema"] = d.ema.module.state_dict()
            if d.head is not None:
                state.update(head=d.head.state_dict(), opt_d=d.opt_d.state_dict())
            common.save_state(args.state, state)
        if stop:
            print(deadline.stop_line(step, args.steps, args.state), flush=True)
            return None

    teacher = common.load(args.teacher)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    extra = {"gan_head": common.half_state_dict(d.head)} if d.head is not None else {}
    torch.save({"text_encoder": teacher["text_encoder"],
                "unet": common.half_state_dict(d.exported()), "token_ids": teacher["token_ids"],
                "fake": common.half_state_dict(d.fake), **extra,
                "channels": teacher["channels"],
                "latent_scaling_factor": teacher["latent_scaling_factor"],
                "steps": d.init_steps + step, "seed": args.seed}, args.out)
    summary = {k: v for k, v in vars(args).items() if k not in ("state", "resume")}
    # init_steps: where this run's curve continues the --init checkpoint's (its step 0).
    summary.update({"init_steps": d.init_steps, "train_wall_s": round(progress.elapsed(), 1),
                    "checkpoint_bytes": os.path.getsize(args.out), "curve": curve,
                    "evals": evals})
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(evals[-1] if evals else {}), flush=True)
    return summary


if __name__ == "__main__":
    train(parse_args())
