"""SD1.5's denoising UNet in the layout of diffusers' UNet2DConditionModel.

Structure (SD1.5: block_out_channels 320/640/1280/1280, 8 heads, cross-attention on 768-d CLIP
states):

  timestep -> sinusoidal embedding (cos half first) -> time_embedding (linear, SiLU, linear)
  sample -> conv_in -> down_blocks (ResNets [+ cross-attention transformers], stride-2 conv)
         -> mid_block (ResNet, transformer, ResNet)
         -> up_blocks (skip concat + ResNets [+ transformers], nearest 2x + conv)
         -> conv_norm_out, SiLU, conv_out -> epsilon

Each transformer (Transformer2DModel) is GroupNorm (eps 1e-6), 1x1 conv in, one block of
self-attention, cross-attention and GEGLU feed-forward (each after a LayerNorm, residual), 1x1
conv out, residual. Parameter names and order equal diffusers' state_dict(), so SD1.5 and DMD2
checkpoints load with strict key matching.
"""

import math
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from tools.sd15.blocks import Downsample2D, ResnetBlock2D, Upsample2D, attention
from tools.sd15.config import resolve_unet, unet_heads

TRANSFORMER_GROUPNORM_EPS = 1e-6
LAYERNORM_EPS = 1e-5


class Attention(nn.Module):
    """diffusers' Attention as used in the UNet: bias-free q/k/v projections, biased output."""

    def __init__(self, query_dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim), nn.Identity()])

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, False)
        for layer in self.to_out:
            out = layer(out)
        return out


class GEGLU(nn.Module):
    """Linear to 2 * dim_out; the first half times exact GELU of the second half."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.attn1 = Attention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.attn2 = Attention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn1(h, h)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    def __init__(self, channels: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_GROUPNORM_EPS)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads,
                                                                       context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b = x.size(0)
        c = x.size(1)
        height = x.size(2)
        width = x.size(3)
        h = self.proj_in(self.norm(x))
        h = h.permute(0, 2, 3, 1).reshape(b, height * width, c)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.reshape(b, height, width, c).permute(0, 3, 1, 2)
        return self.proj_out(h) + x


class CrossAttnDownBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, layers: int,
                 heads: int, context_dim: int, groups: int, eps: float, downsample: bool):
        super().__init__()
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_channels, heads, context_dim, groups) for _ in range(layers)])
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                           groups, eps) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)] if downsample else [])

    def forward(self, h: torch.Tensor, temb: torch.Tensor,
                context: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        skips: List[torch.Tensor] = []
        for resnet, attn in zip(self.resnets, self.attentions):
            h = attn(resnet(h, temb), context)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h, skips


class DownBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, layers: int,
                 groups: int, eps: float, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                           groups, eps) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)] if downsample else [])

    def forward(self, h: torch.Tensor, temb: torch.Tensor,
                context: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        skips: List[torch.Tensor] = []
        for resnet in self.resnets:
            h = resnet(h, temb)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h, skips


def _up_resnets(prev_channels: int, skip_in_channels: int, out_channels: int, temb_channels: int,
                layers: int, groups: int, eps: float) -> nn.ModuleList:
    """An up block's ResNets: input = previous hidden state ++ the matching down-path skip."""
    resnets = []
    for i in range(layers):
        hidden = prev_channels if i == 0 else out_channels
        skip = skip_in_channels if i == layers - 1 else out_channels
        resnets.append(ResnetBlock2D(hidden + skip, out_channels, temb_channels, groups, eps))
    return nn.ModuleList(resnets)


class CrossAttnUpBlock2D(nn.Module):
    def __init__(self, prev_channels: int, skip_in_channels: int, out_channels: int,
                 temb_channels: int, layers: int, heads: int, context_dim: int, groups: int,
                 eps: float, upsample: bool):
        super().__init__()
        self.num_layers = layers
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_channels, heads, context_dim, groups) for _ in range(layers)])
        self.resnets = _up_resnets(prev_channels, skip_in_channels, out_channels, temb_channels,
                                   layers, groups, eps)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if upsample else [])

    def forward(self, h: torch.Tensor, skips: List[torch.Tensor], temb: torch.Tensor,
                context: torch.Tensor, upsample_size: List[int]) -> torch.Tensor:
        for resnet, attn in zip(self.resnets, self.attentions):
            h = torch.cat([h, skips[-1]], dim=1)
            skips = skips[:-1]
            h = attn(resnet(h, temb), context)
        for up in self.upsamplers:
            h = up(h, upsample_size)
        return h


class UpBlock2D(nn.Module):
    def __init__(self, prev_channels: int, skip_in_channels: int, out_channels: int,
                 temb_channels: int, layers: int, groups: int, eps: float, upsample: bool):
        super().__init__()
        self.num_layers = layers
        self.resnets = _up_resnets(prev_channels, skip_in_channels, out_channels, temb_channels,
                                   layers, groups, eps)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if upsample else [])

    def forward(self, h: torch.Tensor, skips: List[torch.Tensor], temb: torch.Tensor,
                context: torch.Tensor, upsample_size: List[int]) -> torch.Tensor:
        for resnet in self.resnets:
            h = torch.cat([h, skips[-1]], dim=1)
            skips = skips[:-1]
            h = resnet(h, temb)
        for up in self.upsamplers:
            h = up(h, upsample_size)
        return h


class UNetMidBlock2DCrossAttn(nn.Module):
    """ResNet, transformer, ResNet (diffusers' single-layer mid block)."""

    def __init__(self, channels: int, temb_channels: int, heads: int, context_dim: int,
                 groups: int, eps: float):
        super().__init__()
        self.attentions = nn.ModuleList([Transformer2DModel(channels, heads, context_dim, groups)])
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(channels, channels, temb_channels, groups, eps) for _ in range(2)])

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, temb)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class UNet2DConditionModel(nn.Module):
    """forward(sample [B, C, h, w], timestep int64 [B], encoder_hidden_states [B, L, D]) -> the
    prediction [B, C, h, w]; any latent size >= 1 (sizes not divisible by 8 are handled like
    diffusers does). Build with from_config(config dict)."""

    def __init__(self, r: Dict[str, Any]):
        super().__init__()
        channels = r["block_out_channels"]
        heads = unet_heads(r)
        groups = r["norm_num_groups"]
        eps = r["norm_eps"]
        context_dim = r["cross_attention_dim"]
        layers = r["layers_per_block"]
        temb_channels = 4 * channels[0]
        n = len(channels)
        self.time_proj_dim = channels[0]
        self.flip_sin_to_cos = bool(r["flip_sin_to_cos"])
        self.freq_shift = float(r["freq_shift"])

        self.conv_in = nn.Conv2d(r["in_channels"], channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels)
        down = []
        for i, kind in enumerate(r["down_block_types"]):
            cin = channels[max(i - 1, 0)]
            last = i == n - 1
            if kind == "CrossAttnDownBlock2D":
                down.append(CrossAttnDownBlock2D(cin, channels[i], temb_channels, layers,
                                                 heads[i], context_dim, groups, eps, not last))
            else:
                down.append(DownBlock2D(cin, channels[i], temb_channels, layers, groups, eps,
                                        not last))
        self.down_blocks = nn.ModuleList(down)
        up = []
        rev = channels[::-1]
        rev_heads = heads[::-1]
        for i, kind in enumerate(r["up_block_types"]):
            prev = rev[max(i - 1, 0)]
            skip_in = rev[min(i + 1, n - 1)]
            last = i == n - 1
            if kind == "CrossAttnUpBlock2D":
                up.append(CrossAttnUpBlock2D(prev, skip_in, rev[i], temb_channels, layers + 1,
                                             rev_heads[i], context_dim, groups, eps, not last))
            else:
                up.append(UpBlock2D(prev, skip_in, rev[i], temb_channels, layers + 1, groups, eps,
                                    not last))
        self.up_blocks = nn.ModuleList(up)
        self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], temb_channels, heads[-1],
                                                 context_dim, groups, eps)
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps)
        self.conv_out = nn.Conv2d(channels[0], r["out_channels"], 3, padding=1)

    @staticmethod
    def from_config(cfg: Dict[str, Any]) -> "UNet2DConditionModel":
        return UNet2DConditionModel(resolve_unet(cfg))

    def timestep_embedding(self, timestep: torch.Tensor) -> torch.Tensor:
        """Sinusoidal embedding in float32: frequencies exp(-ln(10000) * i / (half - shift))."""
        half = self.time_proj_dim // 2
        exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                      device=timestep.device)
        freqs = torch.exp(exponent / (half - self.freq_shift))
        args = timestep.to(torch.float32)[:, None] * freqs[None, :]
        if self.flip_sin_to_cos:
            return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        temb = self.time_embedding(self.timestep_embedding(timestep).to(sample.dtype))
        h = self.conv_in(sample)
        skips: List[torch.Tensor] = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, encoder_hidden_states)
            skips.extend(block_skips)
        h = self.mid_block(h, temb, encoder_hidden_states)
        for block in self.up_blocks:
            n = len(skips) - block.num_layers
            block_skips = skips[n:]
            skips = skips[:n]
            # An up block's upsampler targets the size of the next block's skips.
            target = skips[-1] if len(skips) > 0 else h
            h = block(h, block_skips, temb, encoder_hidden_states,
                      [target.size(2), target.size(3)])
        return self.conv_out(F.silu(self.conv_norm_out(h)))
