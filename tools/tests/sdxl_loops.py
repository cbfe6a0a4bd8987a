"""SDXL sampling written the way diffusers' schedulers compute it, independent of the bundle code
(tools/sd15/recipes.py, tools/sd15/bundle.py, tools/reference_pipeline.py), on the eager models
of a tiny SDXL folder. The tests compare a bundle's images (reference_pipeline.py, or the served
images) with these.

- euler_images: EulerDiscreteScheduler in sigma space (SDXL-Turbo, SDXL-Lightning, and the SDXL
  base teacher with classifier-free guidance): x = init_noise_sigma * randn, with
  init_noise_sigma = sigma_max for trailing spacing and sqrt(sigma_max^2 + 1) for leading; the
  UNet gets x / sqrt(sigma^2 + 1); x0 = x - sigma * eps; x += (x - x0) / sigma * (sigma_next -
  sigma), the last step to sigma 0; the final x is decoded. Guidance: the UNet on [x; x] with
  zero unconditional embeddings (force_zeros_for_empty_prompt), eps_u + g (eps_c - eps_u).
- lcm_images: LCMScheduler as DMD2 samples with it: x0 from eps, denoised = c_out * x0 + c_skip
  * z (LCM's boundary-condition scalings), then z = sqrt(a') denoised + sqrt(1 - a') n with
  fresh noise n from the image's own generator (after its initial latents: the noise contract).

Noise: one CPU torch.Generator per image seeded with its seed, as diffusers does with a list of
generators. Conditioning: diffusers' encode_prompt (both encoders' penultimate states, pooled
text_embeds of text_encoder_2) and time ids [H, W, 0, 0, H, W].
"""

import math
from typing import List, NamedTuple, Optional

import numpy as np
import torch

LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0


class Models(NamedTuple):
    """The eager models of an SDXL folder (tools/sd15/sdxl_folder.SDXLFolder loads them)."""
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scaling_factor: float


def alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                   steps: int = 1000) -> torch.Tensor:
    """diffusers' "scaled_linear" schedule: betas = linspace(sqrt(b0), sqrt(b1))^2 in float32."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float32) ** 2
    alphas = 1.0 - betas
    return torch.cumprod(alphas, dim=0)


def euler_timesteps(steps: int, spacing: str, steps_offset: int = 1,
                    total: int = 1000) -> List[int]:
    """EulerDiscreteScheduler.set_timesteps for "trailing" or "leading" spacing."""
    if spacing == "trailing":
        ts = np.arange(total, 0, -total / steps).round().astype(np.float32) - 1
    else:
        ts = (np.arange(0, steps) * (total // steps)).round()[::-1].astype(np.float32)
        ts += steps_offset
    return [int(t) for t in ts]


def encode(models: Models, items: list):
    """(prompt_embeds [N, 77, D], pooled [N, P]) of items' input_ids / input_ids_2."""
    ids = torch.tensor([item["input_ids"] for item in items], dtype=torch.int64)
    ids_2 = torch.tensor([item["input_ids_2"] for item in items], dtype=torch.int64)
    states = models.text_encoder.text_model.hidden_states(ids)[-2]
    states_2 = models.text_encoder_2.text_model.hidden_states(ids_2)
    last = models.text_encoder_2.text_model.final_layer_norm(states_2[-1])
    rows = torch.arange(ids_2.size(0))
    pooled = models.text_encoder_2.text_projection(last[rows, ids_2.argmax(dim=-1)])
    return torch.cat([states, states_2[-2]], dim=-1), pooled


def _generators(items: list) -> list:
    return [torch.Generator().manual_seed(item["seed"]) for item in items]


def _randn(gens: list, shape: list) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])


def _decode(models: Models, latents: torch.Tensor) -> torch.Tensor:
    image = models.vae(latents / models.scaling_factor)
    pixels = ((image + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous()


def euler_images(models: Models, items: list, width: int, height: int, timesteps: List[int],
                 spacing: str, guidance: float = 1.0) -> torch.Tensor:
    """EulerDiscreteScheduler sampling (module docstring); uint8 [N, H, W, 3]."""
    ac = alphas_cumprod()
    all_sigmas = (((1 - ac) / ac) ** 0.5).numpy()
    sigmas = np.interp(np.array(timesteps, dtype=np.float64), np.arange(len(all_sigmas)),
                       all_sigmas)
    sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]])).to(torch.float32)
    init_sigma = sigmas.max() if spacing in ("trailing", "linspace") else (
        sigmas.max() ** 2 + 1) ** 0.5
    shape = [4, height // 8, width // 8]
    with torch.no_grad():
        x = _randn(_generators(items), shape) * init_sigma
        states, pooled = encode(models, items)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]] * len(items),
                                dtype=torch.float32)
        cfg = guidance > 1.0
        if cfg:
            states = torch.cat([torch.zeros_like(states), states])
            pooled = torch.cat([torch.zeros_like(pooled), pooled])
            time_ids = torch.cat([time_ids, time_ids])
        for i, t in enumerate(timesteps):
            sigma = sigmas[i]
            model_input = x / ((sigma ** 2 + 1) ** 0.5)
            if cfg:
                model_input = torch.cat([model_input, model_input])
            t_in = torch.full([model_input.size(0)], t, dtype=torch.int64)
            eps = models.unet(model_input, t_in, states, pooled, time_ids)
            if cfg:
                eps_uncond, eps_text = eps.chunk(2)
                eps = eps_uncond + guidance * (eps_text - eps_uncond)
            x0 = x - sigma * eps
            derivative = (x - x0) / sigma
            x = x + derivative * (sigmas[i + 1] - sigma)
        return _decode(models, x)


def lcm_images(models: Models, items: list, width: int, height: int,
               timesteps: List[int]) -> torch.Tensor:
    """LCMScheduler sampling as DMD2 uses it (module docstring); uint8 [N, H, W, 3]."""
    ac = alphas_cumprod()
    shape = [4, height // 8, width // 8]
    gens = _generators(items)
    with torch.no_grad():
        z = _randn(gens, shape)
        states, pooled = encode(models, items)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]] * len(items),
                                dtype=torch.float32)
        denoised: Optional[torch.Tensor] = None
        for i, t in enumerate(timesteps):
            eps = models.unet(z, torch.full([len(items)], t, dtype=torch.int64), states, pooled,
                              time_ids)
            a = ac[t]
            x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
            scaled = t * LCM_TIMESTEP_SCALING
            c_skip = LCM_SIGMA_DATA ** 2 / (scaled ** 2 + LCM_SIGMA_DATA ** 2)
            c_out = scaled / math.sqrt(scaled ** 2 + LCM_SIGMA_DATA ** 2)
            denoised = c_out * x0 + c_skip * z
            if i + 1 < len(timesteps):
                a_next = ac[timesteps[i + 1]]
                z = a_next.sqrt() * denoised + (1 - a_next).sqrt() * _randn(gens, shape)
        return _decode(models, denoised)
