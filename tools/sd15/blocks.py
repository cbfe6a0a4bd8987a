"""Building blocks shared by the SD1.5 UNet and VAE decoder, with diffusers' parameter names.

Attribute names (and their registration order) are the state-dict key names of diffusers'
checkpoints: do not rename them. Slots that diffusers fills with parameter-free layers (dropout)
hold nn.Identity so that the indices in the key names (`to_out.0`, `ff.net.2`) stay the same.
"""

import contextlib
import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              upcast_softmax: bool) -> torch.Tensor:
    """Multi-head scaled dot-product attention.

    q: [B, N, heads * d]; k, v: [B, M, heads * d] -> [B, N, heads * d]. The scale is 1/sqrt(d).
    upcast_softmax computes the softmax in float32 (diffusers' VAE attention does).
    """
    b = q.size(0)
    n = q.size(1)
    m = k.size(1)
    c = q.size(2)
    d = c // heads
    q = q.reshape(b, n, heads, d).transpose(1, 2)
    k = k.reshape(b, m, heads, d).transpose(1, 2)
    v = v.reshape(b, m, heads, d).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(d))
    if upcast_softmax:
        probs = scores.float().softmax(dim=-1).to(v.dtype)
    else:
        probs = scores.softmax(dim=-1)
    return torch.matmul(probs, v).transpose(1, 2).reshape(b, n, c)


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D: GroupNorm-SiLU-conv twice, the time embedding added in between
    (UNet only), a 1x1 conv shortcut where the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: Optional[int],
                 groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = (nn.Linear(temb_channels, out_channels)
                              if temb_channels is not None else None)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                              if in_channels != out_channels else None)

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Module):
    """3x3 convolution with stride 2 and padding 1 (diffusers' Downsample2D, use_conv=True)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling to `size`, then a 3x3 convolution.

    The UNet passes the size of the skip connection the next block concatenates: 2x the input
    when the latent size is divisible by 8, and the exact skip size otherwise (what diffusers does
    for such sizes). Nearest to exactly 2x equals nearest with scale factor 2.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: List[int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


@contextlib.contextmanager
def meta_device():
    """Creates every tensor allocated by a factory function inside the block on the 'meta' device
    (shapes only, no memory, no initialisation cost).

    Used to list a full-size model's parameter names and shapes, and to build a model that is then
    materialised with Module.to_empty() and filled from a checkpoint. torch 1.13 has no
    torch.set_default_device, and the modules here do not thread a device argument through.
    """
    factories = {torch.empty, torch.zeros, torch.ones, torch.full}

    class _Meta(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in factories:
                kwargs["device"] = "meta"
            return func(*args, **kwargs)

    with _Meta():
        yield
