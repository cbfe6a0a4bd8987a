"""The noise schedule and sampling timesteps of a diffusers scheduler config, and SD's
scaled-linear schedule and DMD2's timesteps that every bundle writer of this repository uses.

alphas_cumprod follows diffusers' DDPM-family schedulers (DDIM, PNDM, Euler, LCM share it):
betas in float32, alphas_cumprod = cumprod(1 - betas). ddim_timesteps follows DDIMScheduler's
set_timesteps for the three timestep_spacing modes.
"""

from typing import Any, Dict, List

import torch

# Scheduler config fields that change the schedule in ways a dmdserve bundle cannot express.
UNSUPPORTED = {"rescale_betas_zero_snr": False, "thresholding": False}


class ScheduleError(ValueError):
    """A scheduler config or step count the bundle schedule cannot represent."""


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                                 steps: int = 1000) -> torch.Tensor:
    """float32 [steps] alphas_cumprod of SD's scaled-linear schedule, betas = linspace(
    sqrt(beta_start), sqrt(beta_end), steps) ** 2 in float32 as diffusers computes them. The
    defaults are SD1.5's, which the Fashion-MNIST models and the tiny test bundle share."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def dmd2_timesteps(steps: int, total: int = 1000) -> List[int]:
    """DMD2's evenly spaced timesteps, total - 1 - k * (total // steps): 1 -> [999],
    4 -> [999, 749, 499, 249]."""
    return [total - 1 - k * (total // steps) for k in range(steps)]


def alphas_cumprod(cfg: Dict[str, Any]) -> torch.Tensor:
    """float32 [num_train_timesteps] cumulative products of (1 - beta)."""
    for key, default in UNSUPPORTED.items():
        if cfg.get(key, default) != default:
            raise ScheduleError(f"scheduler config: {key}={cfg[key]!r} is not supported")
    steps = int(cfg.get("num_train_timesteps", 1000))
    start = float(cfg.get("beta_start", 0.0001))
    end = float(cfg.get("beta_end", 0.02))
    kind = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif kind == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float32)
    elif kind == "scaled_linear":
        return scaled_linear_alphas_cumprod(start, end, steps)
    else:
        raise ScheduleError(f"scheduler config: beta_schedule {kind!r} is not supported "
                            "(linear, scaled_linear or trained_betas)")
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(cfg: Dict[str, Any], steps: int) -> List[int]:
    """DDIMScheduler.set_timesteps(steps): decreasing timesteps for `timestep_spacing`
    leading (SD1.5: [751, 501, 251, 1] for 4 steps), trailing or linspace."""
    total = int(cfg.get("num_train_timesteps", 1000))
    if not 1 <= steps <= total:
        raise ScheduleError(f"steps must be in [1, {total}], got {steps}")
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing == "leading":
        ratio = total // steps
        ts = [k * ratio + int(cfg.get("steps_offset", 0)) for k in range(steps)]
    elif spacing == "trailing":
        ratio = total / steps
        ts = [int(round(total - k * ratio)) - 1 for k in range(steps)][::-1]
    elif spacing == "linspace":
        ts = [int(round(k * (total - 1) / (steps - 1))) if steps > 1 else 0
              for k in range(steps)]
    else:
        raise ScheduleError(f"scheduler config: timestep_spacing {spacing!r} is not supported")
    ts = sorted(set(ts), reverse=True)
    if len(ts) != steps or not all(0 <= t < total for t in ts):
        raise ScheduleError(f"{steps} steps give invalid timesteps {ts}")
    return ts

