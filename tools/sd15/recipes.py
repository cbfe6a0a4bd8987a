"""Sampling recipes: how a checkpoint is sampled, as the schedule fields of a bundle manifest.

dmd2-sd15-1step  DMD2's one-step SD1.5 generator: one evaluation at t = 999 on pure noise,
                 epsilon prediction, x0 = (z - sqrt(1 - a) eps) / sqrt(a) with
                 a = alphas_cumprod[999] of the scheduler config, no classifier-free guidance
                 (distilled in).
ddim             an ordinary SD1.5 checkpoint (the teacher) with deterministic DDIM: `steps`
                 timesteps as DDIMScheduler.set_timesteps gives them, classifier-free guidance
                 `guidance` (SD's usual 7.5). dmdserve decodes the last step's x0 prediction;
                 diffusers' DDIMScheduler (set_alpha_to_one false) takes one more move to
                 alphas_cumprod[0] = 0.99915 first, which differs from x0 by about 3% of the noise.
"""

from typing import Any, Dict

from tools import bundle_files
from tools.sd15 import schedule

RECIPES = ("dmd2-sd15-1step", "ddim")
DMD2_SD15_TIMESTEP = 999


class RecipeError(ValueError):
    """An unknown recipe or arguments it cannot use."""


def schedule_fields(recipe: str, scheduler_config: Dict[str, Any], steps: int,
                    guidance: float) -> Dict[str, Any]:
    """The manifest fields prediction_type, schedule and guidance_scale of `recipe`."""
    if recipe not in RECIPES:
        raise RecipeError(f"unknown recipe {recipe!r} (known: {', '.join(RECIPES)})")
    prediction = scheduler_config.get("prediction_type", "epsilon")
    alphas = schedule.alphas_cumprod(scheduler_config)
    if recipe == "dmd2-sd15-1step":
        if steps != 1 or guidance != 1.0:
            raise RecipeError("dmd2-sd15-1step is one step without guidance: do not pass "
                              "--steps or --guidance")
        if prediction != "epsilon":
            raise RecipeError(f"dmd2-sd15-1step needs an epsilon-prediction scheduler config, "
                              f"got prediction_type {prediction!r}")
        timesteps = [DMD2_SD15_TIMESTEP]
    else:
        if prediction not in ("epsilon", "sample"):
            raise RecipeError(f"prediction_type {prediction!r} is not supported by "
                              "dmdserve.bundle/v1 (epsilon or sample)")
        if guidance < 1.0:
            raise RecipeError(f"guidance must be >= 1, got {guidance}")
        timesteps = schedule.ddim_timesteps(scheduler_config, steps)
    if max(timesteps) >= len(alphas):
        raise RecipeError(f"timestep {max(timesteps)} is outside the scheduler's "
                          f"{len(alphas)} training timesteps")
    return {
        "prediction_type": prediction,
        "schedule": bundle_files.manifest_schedule(timesteps, alphas, "ddim"),
        "guidance_scale": float(guidance),
    }
