#!/usr/bin/python3
"""Builds a tiny random-weight, SD-like dmdserve model bundle (see docs/BUNDLE.md).

The bundle has the layout and TorchScript contracts of a real one (docs/ARCHITECTURE.md) but its
weights are random: the images it makes are noise. It exists so that the serving stack can be built,
tested and benchmarked without a trained model. Everything is seeded, so the same arguments give
byte-identical files (from the same checkout: TorchScript's debug records hold this file's path).

  /usr/bin/python3 scripts/make_tiny_bundle.py --out models/tiny-random

Components (float32, torch.jit.script):
  text_encoder  int64[B, L] -> float[B, L, 32]: token ids hashed into a 4096-row embedding (ids mod
                4096, which keeps the file small), learned positions, one causal transformer block.
  generator     (float[B, 4, h, w], int64[B], float[B, L, 32]) -> float[B, 4, h, w]: epsilon
                prediction = sample + a small correction from a conv net with a sinusoidal
                timestep embedding and one cross-attention over the text embeddings (a trained
                epsilon model at t=999 also predicts roughly the noisy sample itself).
  decoder       float[B, 4, h, w] -> float[B, 1, 4h, 4w] in [-1, 1] (conv, 2x upsample twice, tanh).

--sdxl makes a dmdserve.bundle/v2 bundle shaped like an SDXL export instead: two tokenizers (the
second pads with "!"), a text encoder (int64[B, L], int64[B, L]) -> (float[B, L, 64], float[B, 16])
made of two of the encoders above (hidden states concatenated; the pooled embedding is a
projection of the second's output at the EOS position, argmax of its ids, as CLIP's), and a
generator that also takes (text_embeds float[B, 16], time_ids float[B, 6]) and adds a per-channel
correction computed from them, so that a wrong time id or pooled row changes the image.
"""

import argparse
import math
import os
import sys
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

HASHED_VOCAB = 4096
MAX_LENGTH = 77
TEXT_DIM = 32
LATENT_CHANNELS = 4
DOWNSAMPLE_FACTOR = 4
IMAGE_CHANNELS = 1
HEADS = 2
BATCH_SIZES = [1, 2, 4, 8]
# Default size first; the second (non-square) size exercises per-size batching and latent shapes.
SUPPORTED_SIZES = [[32, 32], [64, 32]]
LATENT_SCALING_FACTOR = 0.18215
TOKENIZER_FILES = ["vocab.json", "merges.txt", "LICENSE"]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run as a script: make the repository root importable
from tools import bundle_files  # noqa: E402


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Multi-head scaled dot-product attention over [B, N, C] inputs (C divisible by heads)."""
    b = q.size(0)
    c = q.size(2)
    d = c // heads
    q = q.reshape(b, q.size(1), heads, d).transpose(1, 2)
    k = k.reshape(b, k.size(1), heads, d).transpose(1, 2)
    v = v.reshape(b, v.size(1), heads, d).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(d))
    if mask is not None:
        scores = scores + mask
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.transpose(1, 2).reshape(b, -1, c)


def he_init(module: nn.Module) -> None:
    """He-normal weights for every conv and linear layer of `module`: keeps activations of order 1
    through the random layers (PyTorch's default init shrinks them to a flat grey image)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")


class TextEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = HEADS
        self.hashed_vocab = HASHED_VOCAB
        self.token_embedding = nn.Embedding(HASHED_VOCAB, TEXT_DIM)
        self.position_embedding = nn.Parameter(0.1 * torch.randn(MAX_LENGTH, TEXT_DIM))
        self.norm1 = nn.LayerNorm(TEXT_DIM)
        self.qkv = nn.Linear(TEXT_DIM, 3 * TEXT_DIM)
        self.attn_out = nn.Linear(TEXT_DIM, TEXT_DIM)
        self.norm2 = nn.LayerNorm(TEXT_DIM)
        self.fc1 = nn.Linear(TEXT_DIM, 4 * TEXT_DIM)
        self.fc2 = nn.Linear(4 * TEXT_DIM, TEXT_DIM)
        self.final_norm = nn.LayerNorm(TEXT_DIM)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.size(1)
        x = self.token_embedding(torch.remainder(input_ids, self.hashed_vocab))
        x = x + self.position_embedding[:length]
        causal = torch.full([length, length], float("-inf"), dtype=x.dtype,
                            device=x.device).triu(1)
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.attn_out(attention(q, k, v, self.heads, causal))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.final_norm(x)


class Generator(nn.Module):
    def __init__(self, dim: int = 32, text_dim: int = TEXT_DIM):
        super().__init__()
        self.dim = dim
        self.heads = HEADS
        self.residual_scale = 0.05
        self.time_fc1 = nn.Linear(dim, dim)
        self.time_fc2 = nn.Linear(dim, dim)
        self.conv_in = nn.Conv2d(LATENT_CHANNELS, dim, 3, padding=1)
        self.norm1 = nn.GroupNorm(8, dim)
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.attn_norm = nn.GroupNorm(8, dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(text_dim, dim)
        self.to_v = nn.Linear(text_dim, dim)
        self.attn_out = nn.Linear(dim, dim)
        self.norm_out = nn.GroupNorm(8, dim)
        self.conv_out = nn.Conv2d(dim, LATENT_CHANNELS, 3, padding=1)
        he_init(self)

    def timestep_embedding(self, timestep: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        exponent = torch.arange(half, dtype=torch.float32, device=timestep.device) / half
        args = timestep.to(torch.float32)[:, None] * torch.exp(-math.log(10000.0) * exponent)[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        temb = self.timestep_embedding(timestep).to(sample.dtype)
        temb = self.time_fc2(F.silu(self.time_fc1(temb)))
        h = self.conv_in(sample)
        h = h + self.conv1(F.silu(self.norm1(h))) + temb[:, :, None, None]
        b = h.size(0)
        height = h.size(2)
        width = h.size(3)
        x = self.attn_norm(h).flatten(2).transpose(1, 2)
        a = attention(self.to_q(x), self.to_k(encoder_hidden_states),
                      self.to_v(encoder_hidden_states), self.heads, None)
        h = h + self.attn_out(a).transpose(1, 2).reshape(b, self.dim, height, width)
        return sample + self.residual_scale * self.conv_out(F.silu(self.norm_out(h)))


POOLED_DIM = 16
TIME_ID_DIM = 8


class TwoTokenizerTextEncoder(nn.Module):
    """SDXL's text conditioning in miniature: (hidden states of both encoders, pooled)."""

    def __init__(self):
        super().__init__()
        self.encoder = TextEncoder()
        self.encoder_2 = TextEncoder()
        self.projection = nn.Linear(TEXT_DIM, POOLED_DIM, bias=False)

    def forward(self, input_ids: torch.Tensor,
                input_ids_2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden_2 = self.encoder_2(input_ids_2)
        eos = input_ids_2.argmax(dim=1)
        pooled = self.projection(hidden_2[torch.arange(hidden_2.size(0)), eos])
        return torch.cat([self.encoder(input_ids), hidden_2], dim=-1), pooled


class TextTimeGenerator(nn.Module):
    """The generator above on both encoders' states, plus SDXL-style added conditions: each time
    id embedded sinusoidally, concatenated after the pooled embedding, projected to a
    per-channel correction of the prediction."""

    def __init__(self):
        super().__init__()
        self.core = Generator(text_dim=2 * TEXT_DIM)
        self.add_fc1 = nn.Linear(POOLED_DIM + 6 * TIME_ID_DIM, 32)
        self.add_fc2 = nn.Linear(32, LATENT_CHANNELS)
        self.add_scale = 0.05
        self.time_id_dim = TIME_ID_DIM

    def time_id_embedding(self, time_ids: torch.Tensor) -> torch.Tensor:
        half = self.time_id_dim // 2
        exponent = torch.arange(half, dtype=torch.float32, device=time_ids.device) / half
        args = time_ids.to(torch.float32).flatten()[:, None] * torch.exp(
            -math.log(10000.0) * exponent)[None]
        embedded = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
        return embedded.reshape(time_ids.size(0), 6 * self.time_id_dim)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, text_embeds: torch.Tensor,
                time_ids: torch.Tensor) -> torch.Tensor:
        added = torch.cat([text_embeds, self.time_id_embedding(time_ids).to(text_embeds.dtype)], 1)
        correction = self.add_fc2(F.silu(self.add_fc1(added)))
        return (self.core(sample, timestep, encoder_hidden_states)
                + self.add_scale * correction[:, :, None, None])


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(LATENT_CHANNELS, 32, 3, padding=1)
        self.conv1 = nn.Conv2d(32, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv_out = nn.Conv2d(16, IMAGE_CHANNELS, 3, padding=1)
        he_init(self)
        with torch.no_grad():
            self.conv_out.weight.mul_(0.3)  # pixels spread over [0, 255], few saturated

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(latents))
        h = F.silu(self.conv1(h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)))
        h = F.silu(self.conv2(h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)))
        return torch.tanh(self.conv_out(h))


def v2_fields(unconditional: str) -> dict:
    """The --sdxl manifest's v2 fields (docs/BUNDLE.md); the schedule field is added apart."""
    return {
        "format": "dmdserve.bundle/v2",
        "tokenizer_2": {"vocab": "tokenizer/vocab.json", "merges": "tokenizer/merges.txt",
                        "max_length": MAX_LENGTH, "pad_token": "!"},
        "conditioning": "text_time",
        "unconditional": unconditional,
    }


def manifest(name: str, steps: int, step_mode: str, guidance: float, dtype: str) -> dict:
    return {
        "format": "dmdserve.bundle/v1",
        "name": name,
        "description": "Tiny random-weight SD-like bundle for tests and benchmarks: "
                       "its images are noise.",
        "image": {"width": SUPPORTED_SIZES[0][0], "height": SUPPORTED_SIZES[0][1],
                  "channels": IMAGE_CHANNELS, "supported_sizes": SUPPORTED_SIZES},
        "latent": {"channels": LATENT_CHANNELS, "downsample_factor": DOWNSAMPLE_FACTOR},
        "tokenizer": {"vocab": "tokenizer/vocab.json", "merges": "tokenizer/merges.txt",
                      "max_length": MAX_LENGTH, "bos_token": "<|startoftext|>",
                      "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        "components": {"text_encoder": "text_encoder.pt", "generator": "generator.pt",
                       "decoder": "decoder.pt"},
        "prediction_type": "epsilon",
        "schedule": bundle_files.dmd2_sd_schedule(steps, step_mode),
        "guidance_scale": guidance,
        "latent_scaling_factor": LATENT_SCALING_FACTOR,
        "dtype": dtype,
        "batch_sizes": BATCH_SIZES,
        "max_images_per_request": max(BATCH_SIZES),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="bundle directory to write (created)")
    parser.add_argument("--name", default="tiny-random", help="model name in model.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--steps", type=int, default=1, help="sampling steps (DMD2 timesteps)")
    parser.add_argument("--step-mode", choices=["ddim", "renoise"], default="ddim")
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="guidance_scale; > 1 enables classifier-free guidance")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="dtype in model.json (the files stay float32; the pipeline converts)")
    parser.add_argument("--sdxl", action="store_true",
                        help="a dmdserve.bundle/v2 bundle shaped like an SDXL export (see above)")
    parser.add_argument("--unconditional", choices=["empty_prompt", "zeros"],
                        default="empty_prompt", help="--sdxl: the unconditional input of CFG")
    parser.add_argument("--initial-noise-scale", type=float, default=1.0,
                        help="--sdxl: schedule.initial_noise_scale")
    parser.add_argument("--tokenizer-dir",
                        default=os.path.join(REPO_ROOT, "models", "tokenizers", "openai-clip"),
                        help="folder with the CLIP vocab.json, merges.txt and LICENSE to copy")
    args = parser.parse_args()
    if os.environ.get("PYTHONHASHSEED") != "0":
        # TorchScript writes a module's constants in set order, which depends on string hashing:
        # fix the hash seed so that the same arguments give byte-identical files.
        os.execve(sys.executable, [sys.executable] + sys.argv,
                  dict(os.environ, PYTHONHASHSEED="0"))
    if not 1 <= args.steps <= 1000:
        parser.error("--steps must be in [1, 1000]")

    torch.manual_seed(args.seed)
    if args.sdxl:
        components = {"text_encoder": TwoTokenizerTextEncoder(), "generator": TextTimeGenerator(),
                      "decoder": Decoder()}
    else:
        components = {"text_encoder": TextEncoder(), "generator": Generator(),
                      "decoder": Decoder()}
    os.makedirs(os.path.join(args.out, bundle_files.TOKENIZER_SUBDIR), exist_ok=True)
    for name, module in components.items():
        bundle_files.save_component(module.eval(), args.out, name + ".pt")
    bundle_files.copy_tokenizer(args.tokenizer_dir, args.out, TOKENIZER_FILES)
    model_json = manifest(args.name, args.steps, args.step_mode, args.guidance, args.dtype)
    if args.sdxl:
        model_json.update(v2_fields(args.unconditional))
        model_json["schedule"]["initial_noise_scale"] = args.initial_noise_scale
    bundle_files.write_manifest(args.out, model_json)


if __name__ == "__main__":
    main()
