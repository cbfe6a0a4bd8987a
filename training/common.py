"""Shared pieces of the diffusion training stages: latents of the training set, caption batches,
learning-rate schedule, EMA, resumable state files, float16 checkpoints, the sampling loop (the
same loop the C++ pipeline runs, docs/BUNDLE.md "Sampling"), the --device and --stop-after-s
options.

Devices: the models run on --device (default cpu), but every random number is drawn from CPU
torch.Generator objects and then moved, so a CPU run is bit-identical to what it was before the
option existed and a GPU run sees the same batches, noise and initial weights. Files always hold
CPU tensors and only dicts, lists, tuples, numbers, strings and tensors, and are read with
map_location="cpu": a state written on a GPU machine (torch 2.x, whose torch.load defaults to
weights_only=True) resumes on Debian's torch 1.13 and the other way round."""

import copy
import hashlib
import math
import os
import time

import torch

from tools.sd15 import schedule as sd_schedule
from training import captions, data, t2i
from training.autoencoder import load_checkpoint as load_autoencoder

AUTOENCODER_CHECKPOINT = "training/checkpoints/autoencoder.pt"
LATENT_CACHE_DIR = os.environ.get("DMDSERVE_TRAINING_CACHE", "/tmp/dmdserve-training/cache")
CAPTION_DROPOUT = 0.1  # fraction of training captions replaced by the empty prompt (for CFG)


def add_device_argument(parser):
    parser.add_argument("--device", default="cpu",
                        help="torch device of the models (cpu, cuda, cuda:1); random numbers are "
                             "drawn on the CPU either way")


def add_stop_argument(parser):
    parser.add_argument("--stop-after-s", type=float, default=0.0,
                        help="once this invocation has run this many seconds, save --state and "
                             "exit 0 at the end of the current step (0 = off); continue with "
                             "--resume. The final --out is written only when --steps is reached")


def device(name):
    """torch.device for --device; exits with a clear message if CUDA is asked for but missing."""
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA device")
    return dev


class Deadline:
    """--stop-after-s: wall time since this invocation's training started, checked after each
    step."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.start = time.time()

    def passed(self):
        return self.seconds > 0 and time.time() - self.start >= self.seconds

    def stop_line(self, step, steps, state_path):
        return (f"stopped by --stop-after-s {self.seconds:g} at step {step}/{steps} after "
                f"{time.time() - self.start:.0f} s; state saved to {state_path}; continue with "
                f"the same command and --resume")


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
        # e = e * d + p * (1 - d), as one multi-tensor kernel per op on a GPU (the same per-tensor
        # mul_ / add_ on the CPU).
        ema = list(self.module.parameters())
        torch._foreach_mul_(ema, d)
        torch._foreach_add_(ema, [p.detach() for p in module.parameters()], alpha=1 - d)
        for e, b in zip(self.module.buffers(), module.buffers()):
            e.copy_(b)


def to_cpu(obj):
    """Copy of a state (nested dicts, lists, tuples) with every tensor on the CPU; containers are
    copied (a state_dict keeps its type and metadata), never changed in place."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        out = copy.copy(obj)
        for k, v in out.items():
            out[k] = to_cpu(v)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_state(path, state):
    """torch.save of `state` with CPU tensors via a temp file + rename, so an interrupted save
    keeps the old file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(to_cpu(state), path + ".tmp")
    os.replace(path + ".tmp", path)


def load(path):
    """torch.load of a state, checkpoint or pairs file onto the CPU (whatever device wrote it).
    weights_only is left at the version's default: torch 1.13's weights-only reader rejects
    Python floats, torch >= 2.6's default reader accepts everything these files hold."""
    return torch.load(path, map_location="cpu")


def half_state_dict(module):
    """float16 CPU copy of a module's state_dict (integer buffers unchanged)."""
    return {k: (v.half() if v.is_floating_point() else v).cpu()
            for k, v in module.state_dict().items()}


def float_state_dict(state):
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


class TrainingSet:
    """Autoencoder latents of the training images (posterior mean and std, scaled), labels and
    the tokenized captions of every class. Everything stays on the CPU (batches are drawn there);
    `device` is where the autoencoder encodes the images when they are not cached yet."""

    def __init__(self, subset=0, autoencoder=AUTOENCODER_CHECKPOINT, batch_size=1000,
                 cache_dir=LATENT_CACHE_DIR, device="cpu"):
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
            self.mean, self.std = load(cache)
            return
        means, stds = [], []
        encoder = ae.encoder.to(device)
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                mean, logvar = encoder(images[i:i + batch_size].to(device))
                means.append(mean.cpu())
                stds.append(torch.exp(0.5 * logvar).cpu())
        self.mean = torch.cat(means) * self.scaling_factor
        self.std = torch.cat(stds) * self.scaling_factor
        save_state(cache, (self.mean, self.std))

    def __len__(self):
        return len(self.labels)

    def batch(self, batch_size, gen, dropout=CAPTION_DROPOUT):
        """(scaled latents sampled from the posterior, input_ids, labels) for one step, on the
        CPU."""
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
    return sd_schedule.dmd2_timesteps(steps, t2i.NUM_TRAIN_TIMESTEPS)


@torch.no_grad()
def sample(unet, text_encoder, ids, noise, steps, guidance, schedule, empty_ids):
    """The served sampling loop (DDIM, epsilon prediction, CFG) -> scaled x0 latents. ids, noise
    and empty_ids on the device of the models and the schedule."""
    emb = text_encoder(ids)
    uncond = text_encoder(empty_ids[None]).expand_as(emb) if guidance > 1 else None
    timesteps = trailing_timesteps(steps)
    z = noise
    x0 = z
    for k, t in enumerate(timesteps):
        a = schedule.alphas_cumprod[t]
        tt = torch.full((len(z),), t, dtype=torch.int64, device=z.device)
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
