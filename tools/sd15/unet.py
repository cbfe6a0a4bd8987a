"""The SD1.5 and SDXL denoising UNets in the layout of diffusers' UNet2DConditionModel.

Structure (SD1.5: block_out_channels 320/640/1280/1280, 8 heads, cross-attention on 768-d CLIP
states; SDXL: 320/640/1280, 5/10/20 heads, 2048-d states, see below):

  timestep -> sinusoidal embedding (cos half first) -> time_embedding (linear, SiLU, linear)
  [SDXL] + add_embedding(concat(pooled text embedding, sinusoid of each of the 6 time ids))
  sample -> conv_in -> down_blocks (ResNets [+ cross-attention transformers], stride-2 conv)
         -> mid_block (ResNet, transformer, ResNet)
         -> up_blocks (skip concat + ResNets [+ transformers], nearest 2x + conv)
         -> conv_norm_out, SiLU, conv_out -> epsilon

Each transformer (Transformer2DModel) is GroupNorm (eps 1e-6), 1x1 conv in, one block of
self-attention, cross-attention and GEGLU feed-forward (each after a LayerNorm, residual), 1x1
conv out, residual. Parameter names and order equal diffusers' state_dict(), so SD1.5, SDXL and
DMD2 checkpoints load with strict key matching.

What the config selects (SDXL's values in brackets; tools/sd15/config.py resolves them):
- transformer_layers_per_block [1, 2, 10]: blocks per Transformer2DModel at each level; the up
  path uses the reversed list, the mid block the last entry.
- use_linear_projection [true]: proj_in/proj_out are Linear layers applied in token layout
  (GroupNorm, NCHW -> [B, H*W, C], proj_in, blocks, proj_out, back to NCHW) instead of 1x1 convs
  applied in NCHW.
- addition_embed_type "text_time": time_ids [B, 6] (original size, crop top-left, target size,
  height first) each get the timestep's sinusoid of addition_time_embed_dim [256] values;
  concat([text_embeds, the 6 sinusoids in order]) [B, 2816] -> add_embedding (linear, SiLU,
  linear) is added to the timestep embedding.
Both sinusoids are computed in float32 whatever the model dtype, as diffusers does.
"""

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from tools.sd15.blocks import Downsample2D, ResnetBlock2D, Upsample2D, attention
from tools.sd15.config import (resolve_unet, unet_added_cond_dims, unet_heads,
                               unet_transformer_layers)

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


class TransformerSpec:
    """How every Transformer2DModel of one UNet level is built: attention heads, transformer
    blocks, cross-attention context width, GroupNorm groups, linear or 1x1-conv projections."""

    def __init__(self, heads: int, layers: int, context_dim: int, groups: int, linear: bool):
        self.heads = heads
        self.layers = layers
        self.context_dim = context_dim
        self.groups = groups
        self.linear = linear


class Transformer2DModel(nn.Module):
    def __init__(self, channels: int, spec: TransformerSpec):
        super().__init__()
        self.linear = spec.linear
        self.norm = nn.GroupNorm(spec.groups, channels, eps=TRANSFORMER_GROUPNORM_EPS)
        self.proj_in = (nn.Linear(channels, channels) if spec.linear
                        else nn.Conv2d(channels, channels, 1))
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, spec.heads, spec.context_dim)
             for _ in range(spec.layers)])
        self.proj_out = (nn.Linear(channels, channels) if spec.linear
                         else nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b = x.size(0)
        c = x.size(1)
        height = x.size(2)
        width = x.size(3)
        h = self.norm(x)
        if self.linear:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(b, height * width, c))
        else:
            h = self.proj_in(h).permute(0, 2, 3, 1).reshape(b, height * width, c)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h).reshape(b, height, width, c).permute(0, 3, 1, 2)
        else:
            h = self.proj_out(h.reshape(b, height, width, c).permute(0, 3, 1, 2))
        return h + x


class CrossAttnDownBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, layers: int,
                 spec: TransformerSpec, groups: int, eps: float, downsample: bool):
        super().__init__()
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_channels, spec) for _ in range(layers)])
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
                 temb_channels: int, layers: int, spec: TransformerSpec, groups: int, eps: float,
                 upsample: bool):
        super().__init__()
        self.num_layers = layers
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_channels, spec) for _ in range(layers)])
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

    def __init__(self, channels: int, temb_channels: int, spec: TransformerSpec, groups: int,
                 eps: float):
        super().__init__()
        self.attentions = nn.ModuleList([Transformer2DModel(channels, spec)])
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


class Timesteps(nn.Module):
    """diffusers' Timesteps (no parameters): each value -> a sinusoidal embedding of `dim` values,
    frequencies exp(-ln(10000) * i / (dim / 2 - freq_shift)), cos half first when
    flip_sin_to_cos. Computed in float32 (values cast to float32) whatever the caller's dtype."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float):
        super().__init__()
        self.dim = dim
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                      device=values.device)
        freqs = torch.exp(exponent / (half - self.freq_shift))
        args = values.to(torch.float32)[:, None] * freqs[None, :]
        if self.flip_sin_to_cos:
            return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class UNet2DConditionModel(nn.Module):
    """forward(sample [B, C, h, w], timestep int64 [B], encoder_hidden_states [B, L, D],
    text_embeds [B, P], time_ids [B, 6]) -> the prediction [B, C, h, w]; any latent size >= 1
    (sizes not divisible by 8 are handled like diffusers does). text_embeds and time_ids are the
    "text_time" added conditioning (SDXL): required with it, ignored without it (SD1.5). Build
    with from_config(config dict, family)."""

    def __init__(self, r: Dict[str, Any]):
        super().__init__()
        channels = r["block_out_channels"]
        heads = unet_heads(r)
        transformer_layers = unet_transformer_layers(r)
        groups = r["norm_num_groups"]
        eps = r["norm_eps"]
        layers = r["layers_per_block"]
        temb_channels = 4 * channels[0]
        n = len(channels)
        specs = [TransformerSpec(heads[i], transformer_layers[i], r["cross_attention_dim"],
                                 groups, r["use_linear_projection"]) for i in range(n)]
        self.time_proj = Timesteps(channels[0], bool(r["flip_sin_to_cos"]),
                                   float(r["freq_shift"]))
        add_time_dim, _ = unet_added_cond_dims(r)  # 0 without added conditioning: unused
        self.add_time_proj = Timesteps(add_time_dim, bool(r["flip_sin_to_cos"]),
                                       float(r["freq_shift"]))

        self.conv_in = nn.Conv2d(r["in_channels"], channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels)
        self.add_embedding = (
            TimestepEmbedding(r["projection_class_embeddings_input_dim"], temb_channels)
            if add_time_dim > 0 else None)
        down = []
        for i, kind in enumerate(r["down_block_types"]):
            cin = channels[max(i - 1, 0)]
            last = i == n - 1
            if kind == "CrossAttnDownBlock2D":
                down.append(CrossAttnDownBlock2D(cin, channels[i], temb_channels, layers, specs[i],
                                                 groups, eps, not last))
            else:
                down.append(DownBlock2D(cin, channels[i], temb_channels, layers, groups, eps,
                                        not last))
        self.down_blocks = nn.ModuleList(down)
        up = []
        rev = channels[::-1]
        rev_specs = specs[::-1]
        for i, kind in enumerate(r["up_block_types"]):
            prev = rev[max(i - 1, 0)]
            skip_in = rev[min(i + 1, n - 1)]
            last = i == n - 1
            if kind == "CrossAttnUpBlock2D":
                up.append(CrossAttnUpBlock2D(prev, skip_in, rev[i], temb_channels, layers + 1,
                                             rev_specs[i], groups, eps, not last))
            else:
                up.append(UpBlock2D(prev, skip_in, rev[i], temb_channels, layers + 1, groups, eps,
                                    not last))
        self.up_blocks = nn.ModuleList(up)
        self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], temb_channels, specs[-1], groups,
                                                 eps)
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps)
        self.conv_out = nn.Conv2d(channels[0], r["out_channels"], 3, padding=1)

    @staticmethod
    def from_config(cfg: Dict[str, Any], family: str = "sd15") -> "UNet2DConditionModel":
        """family: "sd15" accepts SD1.5 configs only, "sdxl" SDXL's too (config.resolve_unet)."""
        return UNet2DConditionModel(resolve_unet(cfg, family))

    def timestep_embedding(self, timestep: torch.Tensor) -> torch.Tensor:
        """The timestep's sinusoidal embedding [B, block_out_channels[0]] in float32."""
        return self.time_proj(timestep)

    def time_ids_embedding(self, time_ids: torch.Tensor) -> torch.Tensor:
        """time_ids [B, 6] -> [B, 6 * addition_time_embed_dim] float32: each id's sinusoid, in
        time_ids order."""
        return self.add_time_proj(time_ids.flatten()).reshape(time_ids.size(0), -1)

    def added_embedding_input(self, text_embeds: torch.Tensor,
                              time_ids: torch.Tensor) -> torch.Tensor:
        """add_embedding's input: the pooled text embedding first, then the time id sinusoids."""
        time_embeds = self.time_ids_embedding(time_ids).to(text_embeds.dtype)
        return torch.cat([text_embeds, time_embeds], dim=-1)

    def embedding(self, timestep: torch.Tensor, text_embeds: Optional[torch.Tensor],
                  time_ids: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """What every ResNet gets: time_embedding(sinusoid) [+ add_embedding(...)] [B, 4 C0]."""
        emb = self.time_embedding(self.timestep_embedding(timestep).to(dtype))
        if self.add_embedding is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet needs text_embeds and time_ids (text_time "
                                 "conditioning)")
            added = self.added_embedding_input(text_embeds, time_ids).to(dtype)
            emb = emb + self.add_embedding(added)
        return emb

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, text_embeds: Optional[torch.Tensor] = None,
                time_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        temb = self.embedding(timestep, text_embeds, time_ids, sample.dtype)
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
