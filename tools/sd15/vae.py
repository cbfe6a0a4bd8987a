"""The decode path of SD1.5's VAE (diffusers' AutoencoderKL): post_quant_conv + decoder.

  latents (already divided by scaling_factor) -> post_quant_conv (1x1)
  -> decoder: conv_in -> mid_block (ResNet, single-head self-attention, ResNet)
     -> up_blocks (3 ResNets each, nearest 2x + conv in all but the last)
     -> GroupNorm, SiLU, conv_out -> image, nominally in [-1, 1]

Every GroupNorm uses eps 1e-6. Key names are AutoencoderKL's (`decoder.` prefix kept); a full
AutoencoderKL checkpoint's encoder.* and quant_conv.* keys are not part of this module.
"""

from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from tools.sd15.blocks import ResnetBlock2D, Upsample2D, attention
from tools.sd15.config import resolve_vae

EPS = 1e-6


class VAEAttention(nn.Module):
    """Single-head self-attention over the pixels with biased projections and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Identity()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.size(0)
        c = x.size(1)
        height = x.size(2)
        width = x.size(3)
        h = self.group_norm(x).reshape(b, c, height * width).transpose(1, 2)
        h = attention(self.to_q(h), self.to_k(h), self.to_v(h), 1, True)
        for layer in self.to_out:
            h = layer(h)
        return h.transpose(1, 2).reshape(b, c, height, width) + x


class UNetMidBlock2D(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(channels, channels, None, groups, EPS) for _ in range(2)])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h, None)
        for attn in self.attentions:
            h = attn(h)
        return self.resnets[1](h, None)


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int,
                 upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups,
                           EPS) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if upsample else [])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            h = resnet(h, None)
        for up in self.upsamplers:
            h = up(h, [2 * h.size(2), 2 * h.size(3)])
        return h


class Decoder(nn.Module):
    def __init__(self, r: Dict[str, Any]):
        super().__init__()
        channels: List[int] = r["block_out_channels"]
        groups = r["norm_num_groups"]
        rev = channels[::-1]
        self.conv_in = nn.Conv2d(r["latent_channels"], rev[0], 3, padding=1)
        self.up_blocks = nn.ModuleList(
            [UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], r["layers_per_block"] + 1, groups,
                              i < len(rev) - 1) for i in range(len(rev))])
        self.mid_block = UNetMidBlock2D(rev[0], groups, bool(r["mid_block_add_attention"]))
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=EPS)
        self.conv_out = nn.Conv2d(channels[0], r["out_channels"], 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class VAEDecoder(nn.Module):
    """forward(latents [B, latent_channels, h, w]) -> image [B, out_channels, f*h, f*w] with
    f = 2 ** (len(block_out_channels) - 1) (8 for SD1.5). The input is the latent already divided
    by scaling_factor, as AutoencoderKL.decode expects. Build with from_config(config dict)."""

    def __init__(self, r: Dict[str, Any]):
        super().__init__()
        self.decoder = Decoder(r)
        if r["use_post_quant_conv"]:
            self.post_quant_conv = nn.Conv2d(r["latent_channels"], r["latent_channels"], 1)
        else:
            self.post_quant_conv = None

    @staticmethod
    def from_config(cfg: Dict[str, Any]) -> "VAEDecoder":
        return VAEDecoder(resolve_vae(cfg))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)
