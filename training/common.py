"""Shared pieces of the diffusion training stages: latents of the training set, caption batches,
learning-rate schedule, EMA, resumable state files, float16 checkpoints and the sampling loop
(the same loop the C++ pipeline runs, docs/BUNDLE.md "Sampling")."""

import copy
import hashlib
import math
import os
import time

import torch

from training import captions, data, t2i
from training.train_autoencoder import load_checkpoint as load_autoencoder

AUTOENCODER_CHECKPOINT = "training/checkpoints/autoencoder.pt"
LATENT_CACHE_DIR = os.environ.get("DMDSERVE_TRAINING_CACHE", "/tmp/dmdserve-training/cache")
CAPTION_DROPOUT = 0.1  # fraction of training captions replaced by the empty prompt (for CFG)


def lr_at(step, steps, peak, warmup=200, floor=0.1):
    """Linear warm-up, then cosine decay from `peak` to `floor * peak`."""
    warmup = min(warmup, max(1, steps // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class Ema:
    """Exponential moving average of a module's parameters (buffers copied)."""

    def __init__(self, module, decay):
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module, decay=None):
        d = self.decay if decay is None else decay
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.mul_(d).add_(p.detach(), alpha=1 - d)
        for e, b in zip(self.module.buffers(), module.buffers()):
            e.copy_(b)


def save_state(path, state):
    """torch.save via a temp file + rename, so an interrupted save keeps the old file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def half_state_dict(module):
    return {k: (v.half() if v.is_floating_point() else v) for k, v in module.state_dict().items()}


def float_state_dict(state):
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


class TrainingSet:
    """Autoencoder latents of the training images (posterior mean and std, scaled), labels and
    the tokenized captions of every class."""

    def __init__(self, subset=0, autoencoder=AUTOENCODER_CHECKPOINT, batch_size=1000,
                 cache_dir=LATENT_CACHE_DIR):
        ae, self.scaling_factor = load_autoencoder(autoencoder)
        self.decoder = ae.decoder
        images, self.labels = data.load_split("train", subset or None)
        # [10, phrasings, 77] caption ids, and the empty prompt (the server's unconditional input).
        self.caption_ids = torch.stack([captions.tokenize(list(p)) for p in captions.CAPTIONS])
        self.empty_ids = captions.tokenize([""])[0]
        # Encoding 60k images takes a minute on one core: cache by autoencoder content + subset.
        with open(autoencoder, "rb") as f:
            key = hashlib.sha256(f.read()).hexdigest()[:16]
        cache = os.path.join(cache_dir, f"latents-{key}-{len(images)}.pt")
        if os.path.exists(cache):
            self.mean, self.std = torch.load(cache)
            return
        means, stds = [], []
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                mean, logvar = ae.encoder(images[i:i + batch_size])
                means.append(mean)
                stds.append(torch.exp(0.5 * logvar))
        self.mean = torch.cat(means) * self.scaling_factor
        self.std = torch.cat(stds) * self.scaling_factor
        save_state(cache, (self.mean, self.std))

    def __len__(self):
        return len(self.labels)

    def batch(self, batch_size, gen, dropout=CAPTION_DROPOUT):
        """(scaled latents sampled from the posterior, input_ids, labels) for one step."""
        idx = torch.randint(len(self.labels), (batch_size,), generator=gen)
        labels = self.labels[idx]
        x0 = self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=gen)
        phrasing = torch.randint(self.caption_ids.size(1), (batch_size,), generator=gen)
        ids = self.caption_ids[labels, phrasing]
        drop = torch.rand(batch_size, generator=gen) < dropout
        ids = torch.where(drop[:, None], self.empty_ids[None], ids)
        return x0, ids, labels


def prompt_ids(labels, phrasing=0):
    """input_ids of one caption phrasing per label."""
    return captions.tokenize([captions.CAPTIONS[int(c)][phrasing] for c in labels])


def trailing_timesteps(steps):
    """DMD2's / the bundles' spacing: 999 - k * (1000 // steps)."""
    return [999 - k * (t2i.NUM_TRAIN_TIMESTEPS // steps) for k in range(steps)]


@torch.no_grad()
def sample(unet, text_encoder, ids, noise, steps, guidance, schedule, empty_ids):
    """The served sampling loop (DDIM, epsilon prediction, CFG) -> scaled x0 latents."""
    emb = text_encoder(ids)
    uncond = text_encoder(empty_ids[None]).expand_as(emb) if guidance > 1 else None
    timesteps = trailing_timesteps(steps)
    z = noise
    x0 = z
    for k, t in enumerate(timesteps):
        a = schedule.alphas_cumprod[t]
        tt = torch.full((len(z),), t, dtype=torch.int64)
        if uncond is not None:
            eps_u, eps_c = unet(torch.cat([z, z]), torch.cat([tt, tt]),
                                torch.cat([uncond, emb])).chunk(2)
            eps = eps_u + (eps_c - eps_u) * guidance
        else:
            eps = unet(z, tt, emb)
        x0 = (z - eps * (1 - a).sqrt()) / a.sqrt()
        if k + 1 == len(timesteps):
            break
        a_next = schedule.alphas_cumprod[timesteps[k + 1]]
        eps = (z - x0 * a.sqrt()) / (1 - a).sqrt()
        z = x0 * a_next.sqrt() + eps * (1 - a_next).sqrt()
    return x0


def to_uint8(images):
    """Decoder output in [-1, 1] -> uint8, rounded as the server does."""
    return ((images + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)


class Progress:
    """Progress lines: step/total, percent, rate, ETA and the given metrics."""

    def __init__(self, total, start_step=0, elapsed=0.0):
        self.total = total
        self.start = time.time() - elapsed
        self.window_start = time.time()
        self.window_steps = 0

    def elapsed(self):
        return time.time() - self.start

    def tick(self):
        self.window_steps += 1

    def line(self, step, **metrics):
        rate = self.window_steps / max(1e-9, time.time() - self.window_start)
        eta = (self.total - step) / max(rate, 1e-9)
        self.window_start, self.window_steps = time.time(), 0
        filled = int(20 * step / self.total)
        parts = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        return (f"[{'#' * filled}{'.' * (20 - filled)}] {step}/{self.total} "
                f"{100 * step / self.total:.0f}% {parts} {rate:.2f} steps/s eta {eta / 60:.1f} min")
