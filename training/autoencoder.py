"""A small KL-regularised autoencoder (Stable-Diffusion-VAE-like) for 32x32x1 images.

Encoder: 32x32x1 -> 8x8x(2*4) (mean, logvar); decoder: 4x8x8 latents -> 32x32x1 in [-1, 1] (tanh).
Both use residual blocks with GroupNorm + SiLU and stride-2 convs / nearest upsampling, like SD's
AutoencoderKL at a much smaller width. The decoder is a stand-alone module whose forward takes
*unscaled* latents, as docs/ARCHITECTURE.md expects (`decoder(x0 / latent_scaling_factor)`).
"""

import torch
from torch import nn
import torch.nn.functional as F

LATENT_CHANNELS = 4
IMAGE_CHANNELS = 1


def _norm(channels):
    return nn.GroupNorm(8, channels)


class ResBlock(nn.Module):
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """[B,1,32,32] -> (mean, logvar), each [B,4,8,8]."""

    def __init__(self, widths=(32, 64, 64)):
        super().__init__()
        c0, c1, c2 = widths
        self.net = nn.Sequential(
            nn.Conv2d(IMAGE_CHANNELS, c0, 3, padding=1),
            ResBlock(c0, c0),
            nn.Conv2d(c0, c0, 3, stride=2, padding=1),  # 16x16
            ResBlock(c0, c1),
            nn.Conv2d(c1, c1, 3, stride=2, padding=1),  # 8x8
            ResBlock(c1, c2),
            ResBlock(c2, c2),
            _norm(c2),
            nn.SiLU(),
            nn.Conv2d(c2, 2 * LATENT_CHANNELS, 3, padding=1),
        )

    def forward(self, x):
        mean, logvar = self.net(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)


class Decoder(nn.Module):
    """forward(latents: float[B,4,8,8]) -> float[B,1,32,32] in [-1, 1]. Scriptable."""

    def __init__(self, widths=(32, 64, 64)):
        super().__init__()
        c0, c1, c2 = widths
        self.net = nn.Sequential(
            nn.Conv2d(LATENT_CHANNELS, c2, 3, padding=1),
            ResBlock(c2, c2),
            ResBlock(c2, c1),
            nn.Upsample(scale_factor=2.0, mode="nearest"),  # 16x16
            nn.Conv2d(c1, c1, 3, padding=1),
            ResBlock(c1, c0),
            nn.Upsample(scale_factor=2.0, mode="nearest"),  # 32x32
            nn.Conv2d(c0, c0, 3, padding=1),
            ResBlock(c0, c0),
            _norm(c0),
            nn.SiLU(),
            nn.Conv2d(c0, IMAGE_CHANNELS, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents)


class AutoencoderKL(nn.Module):
    """Encoder + decoder. forward(x, sample) returns (reconstruction, mean, logvar)."""

    def __init__(self, widths=(32, 64, 64)):
        super().__init__()
        self.encoder = Encoder(widths)
        self.decoder = Decoder(widths)

    def encode(self, x, sample=False, generator=None):
        mean, logvar = self.encoder(x)
        if not sample:
            return mean, mean, logvar
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise, mean, logvar

    def forward(self, x, sample=True, generator=None):
        z, mean, logvar = self.encode(x, sample, generator)
        return self.decoder(z), mean, logvar


def kl_divergence(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over latent dims, averaged over the batch."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


def psnr(mse, peak_to_peak=2.0):
    """PSNR in dB for a mean squared error on images with the given value range ([-1,1] -> 2)."""
    return 10.0 * torch.log10(torch.tensor(peak_to_peak ** 2 / mse)).item()


@torch.no_grad()
def latent_scaling_factor(model, images, batch_size=500):
    """1 / std of the encoder's latent means over `images` (SD's 0.18215, computed)."""
    means = [model.encoder(images[i:i + batch_size])[0] for i in range(0, len(images), batch_size)]
    return 1.0 / torch.cat(means).std().item()


@torch.no_grad()
def reconstruction_mse(model, images, batch_size=500):
    """Mean squared error of decoder(encoder mean) over `images` in [-1, 1]."""
    total = 0.0
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        total += F.mse_loss(model.decoder(model.encoder(x)[0]), x, reduction="sum").item()
    return total / images.numel()


def export_decoder(decoder, path=None):
    """Scripts the decoder to TorchScript; saves it to `path` if given. Returns the module."""
    scripted = torch.jit.script(decoder.eval())
    if path:
        scripted.save(path)
    return scripted


def load_checkpoint(path):
    """Loads a train_autoencoder --out checkpoint (float16 weights, on the CPU); returns
    (AutoencoderKL in eval mode, latent scaling factor)."""
    ckpt = torch.load(path)
    model = AutoencoderKL()
    model.load_state_dict({k: v.float() for k, v in ckpt["model"].items()})
    return model.eval(), ckpt["latent_scaling_factor"]
