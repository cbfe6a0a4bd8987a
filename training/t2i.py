"""Text encoder, latent UNet and noise schedule of the Fashion-MNIST text-to-image model.

The structure mirrors Stable Diffusion so that the same C++ pipeline serves it (docs/BUNDLE.md):

- `TextEncoder`: CLIP input_ids int64[B, 77] -> float[B, 77, TEXT_DIM]. The ids seen in the
  training captions (plus BOS/EOS) are remapped to a compact embedding table with
  `torch.searchsorted` over a sorted id list; every other id maps to row 0 (UNK). Learned
  positions, causal pre-LN transformer blocks and a final LayerNorm, like CLIP's text tower.
- `UNet`: epsilon prediction on latents float[B, 4, 8, 8] (scaled by the autoencoder's latent
  scaling factor) at an int64 timestep, cross-attending to the text embeddings; two resolutions
  (8x8 and 4x4) with ResNet blocks, self/cross-attention transformer blocks and skip connections.
- `Schedule`: SD1.5's scaled-linear beta schedule (0.00085 -> 0.012 over 1000 steps) in float32,
  computed exactly as diffusers does.

All modules are `torch.jit.script`-able (the bundle stores them as TorchScript).
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from tools.sd15 import schedule as sd_schedule
from training import captions

MAX_LENGTH = 77
TEXT_DIM = 64
LATENT_CHANNELS = 4
NUM_TRAIN_TIMESTEPS = 1000
BOS_ID = 49406
EOS_ID = 49407


def known_token_ids() -> List[int]:
    """Sorted CLIP ids of every token in the training captions, plus BOS and EOS."""
    ids = {BOS_ID, EOS_ID}
    for phrasings in captions.CAPTIONS:
        for text in phrasings:
            ids.update(captions.tokenizer().encode(text))
    return sorted(ids)


class Schedule:
    """SD's scaled-linear DDPM schedule: betas = linspace(sqrt(b0), sqrt(b1), 1000) ** 2.
    Computed on the CPU (the same values everywhere), then kept on `device`: the timesteps
    given to add_noise / x0_from_eps must be there too."""

    def __init__(self, beta_start=0.00085, beta_end=0.012, steps=NUM_TRAIN_TIMESTEPS,
                 device="cpu"):
        self.alphas_cumprod = sd_schedule.scaled_linear_alphas_cumprod(beta_start, beta_end,
                                                                       steps).to(device)

    def add_noise(self, x0, noise, t):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def x0_from_eps(self, xt, eps, t):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (xt - (1 - a).sqrt() * eps) / a.sqrt()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Multi-head scaled dot-product attention over [B, N, C] inputs."""
    b, n, c = q.shape
    d = c // heads
    q = q.reshape(b, n, heads, d).transpose(1, 2)
    k = k.reshape(b, k.size(1), heads, d).transpose(1, 2)
    v = v.reshape(b, v.size(1), heads, d).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(d))
    if mask is not None:
        scores = scores + mask
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.transpose(1, 2).reshape(b, n, c)


class TextBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj(attention(q, k, v, self.heads, mask))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TextEncoder(nn.Module):
    """input_ids int64[B, L] -> float[B, L, dim]; unknown ids share the UNK row 0."""

    def __init__(self, token_ids: List[int], dim: int = TEXT_DIM, layers: int = 2,
                 heads: int = 4):
        super().__init__()
        self.register_buffer("token_ids", torch.tensor(sorted(token_ids), dtype=torch.int64))
        self.token_embedding = nn.Embedding(len(token_ids) + 1, dim)
        self.position_embedding = nn.Parameter(0.02 * torch.randn(MAX_LENGTH, dim))
        self.blocks = nn.ModuleList([TextBlock(dim, heads) for _ in range(layers)])
        self.final_norm = nn.LayerNorm(dim)

    def remap(self, input_ids: torch.Tensor) -> torch.Tensor:
        """CLIP ids -> rows of the compact table (1 + index in token_ids, or 0 if unknown)."""
        idx = torch.searchsorted(self.token_ids, input_ids)
        idx = idx.clamp(max=self.token_ids.numel() - 1)
        known = self.token_ids[idx] == input_ids
        return torch.where(known, idx + 1, torch.zeros_like(idx))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.size(1)
        x = self.token_embedding(self.remap(input_ids)) + self.position_embedding[:length]
        mask = torch.full([length, length], float("-inf"), dtype=x.dtype,
                          device=x.device).triu(1)
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(16, channels)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_dim: int):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch)
        self.norm2 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SpatialTransformer(nn.Module):
    """GroupNorm -> tokens -> self-attention, cross-attention to the text, MLP -> residual."""

    def __init__(self, ch: int, context_dim: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = _norm(ch)
        self.norm1 = nn.LayerNorm(ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj1 = nn.Linear(ch, ch)
        self.norm2 = nn.LayerNorm(ch)
        self.to_q = nn.Linear(ch, ch)
        self.to_kv = nn.Linear(context_dim, 2 * ch)
        self.proj2 = nn.Linear(ch, ch)
        self.norm3 = nn.LayerNorm(ch)
        self.fc1 = nn.Linear(ch, 4 * ch)
        self.fc2 = nn.Linear(4 * ch, ch)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(self.norm1(t)).chunk(3, dim=-1)
        t = t + self.proj1(attention(q, k, v, self.heads, None))
        k, v = self.to_kv(context).chunk(2, dim=-1)
        t = t + self.proj2(attention(self.to_q(self.norm2(t)), k, v, self.heads, None))
        t = t + self.fc2(F.gelu(self.fc1(self.norm3(t))))
        return x + t.transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    """(sample float[B, 4, h, w], timestep int64[B], text float[B, L, D]) -> epsilon."""

    def __init__(self, ch: int = 48, context_dim: int = TEXT_DIM):
        super().__init__()
        self.ch = ch
        temb_dim = 4 * ch
        self.time_fc1 = nn.Linear(ch, temb_dim)
        self.time_fc2 = nn.Linear(temb_dim, temb_dim)
        self.conv_in = nn.Conv2d(LATENT_CHANNELS, ch, 3, padding=1)
        self.down0_res = ResBlock(ch, ch, temb_dim)
        self.down0_attn = SpatialTransformer(ch, context_dim)
        self.downsample = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.down1_res = ResBlock(ch, 2 * ch, temb_dim)
        self.down1_attn = SpatialTransformer(2 * ch, context_dim)
        self.mid_res1 = ResBlock(2 * ch, 2 * ch, temb_dim)
        self.mid_attn = SpatialTransformer(2 * ch, context_dim)
        self.mid_res2 = ResBlock(2 * ch, 2 * ch, temb_dim)
        self.up1_res = ResBlock(4 * ch, 2 * ch, temb_dim)
        self.up1_attn = SpatialTransformer(2 * ch, context_dim)
        self.upsample = nn.Conv2d(2 * ch, ch, 3, padding=1)
        self.up0_res = ResBlock(2 * ch, ch, temb_dim)
        self.up0_attn = SpatialTransformer(ch, context_dim)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, LATENT_CHANNELS, 3, padding=1)

    def timestep_embedding(self, timestep: torch.Tensor) -> torch.Tensor:
        half = self.ch // 2
        exponent = torch.arange(half, dtype=torch.float32, device=timestep.device) / half
        args = timestep.to(torch.float32)[:, None] * torch.exp(-math.log(10000.0) * exponent)[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1)

    def encode(self, sample: torch.Tensor, timestep: torch.Tensor,
               encoder_hidden_states: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The down path and middle: (time embedding, 8x8 skip, 4x4 skip, bottleneck
        float[B, 2 * ch, h / 2, w / 2]). DMD2's GAN head reads the bottleneck."""
        temb = self.timestep_embedding(timestep).to(sample.dtype)
        temb = self.time_fc2(F.silu(self.time_fc1(temb)))
        h0 = self.down0_attn(self.down0_res(self.conv_in(sample), temb), encoder_hidden_states)
        h1 = self.down1_res(self.downsample(h0), temb)
        h1 = self.down1_attn(h1, encoder_hidden_states)
        m = self.mid_res1(h1, temb)
        m = self.mid_res2(self.mid_attn(m, encoder_hidden_states), temb)
        return temb, h0, h1, m

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        temb, h0, h1, m = self.encode(sample, timestep, encoder_hidden_states)
        u = self.up1_attn(self.up1_res(torch.cat([m, h1], dim=1), temb), encoder_hidden_states)
        u = self.upsample(F.interpolate(u, scale_factor=2.0, mode="nearest"))
        u = self.up0_attn(self.up0_res(torch.cat([u, h0], dim=1), temb), encoder_hidden_states)
        return self.conv_out(F.silu(self.norm_out(u)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
