"""Sampling recipes: how a checkpoint is sampled, as the schedule fields of a bundle manifest.

Every recipe is epsilon prediction on the folder's noise schedule (alphas_cumprod from its
scheduler config) and is sampled by dmdserve's loop (docs/BUNDLE.md): x0 from the prediction,
then to the next timestep with the implied noise (step_mode "ddim") or fresh noise ("renoise").

SD1.5 folders:
dmd2-sd15-1step  DMD2's one-step SD1.5 generator (tianweiy/DMD2, README): one evaluation at
                 t = 999 on pure noise, x0 = (z - sqrt(1 - a) eps) / sqrt(a) with
                 a = alphas_cumprod[999], no classifier-free guidance (distilled in).
ddim             an ordinary checkpoint (the teacher) with deterministic DDIM: `steps` timesteps
                 as DDIMScheduler.set_timesteps gives them for the folder's timestep_spacing,
                 classifier-free guidance `guidance` (SD1.5: 50 steps, 7.5). dmdserve decodes the
                 last step's x0 prediction; diffusers' DDIMScheduler (set_alpha_to_one false)
                 takes one more move to alphas_cumprod[0] = 0.99915 first, which differs from x0
                 by about 3% of the noise.

SDXL folders (dmdserve.bundle/v2; see each recipe function for its source):
dmd2-sdxl-4step  DMD2's four-step SDXL generator: t = 999, 749, 499, 249, fresh noise between
                 steps, no guidance.
dmd2-sdxl-1step  DMD2's one-step SDXL generator: one evaluation at t = 399.
sdxl-turbo       SDXL-Turbo: one step at t = 999 from diffusers' trailing-spacing start
                 (initial_noise_scale sqrt(1 - alphas_cumprod[999])), no guidance.
sdxl-lightning   SDXL-Lightning's 2-, 4- or 8-step UNets: trailing Euler timesteps,
                 deterministic, trailing-spacing start, no guidance.
ddim             the SDXL base model as a teacher: `steps` timesteps for the folder's spacing
                 (SDXL base: leading), guidance `guidance` (default 5.0, the SDXL pipeline's)
                 with zero unconditional embeddings when the folder forces them. Deterministic
                 Euler, which diffusers' EulerDiscreteScheduler is: x_next = x0 + sigma_next *
                 (x - x0) / sigma is DDIM on the normalised latents x * sqrt(a), and its last
                 step (to sigma 0) is x0.

Every recipe's timesteps can be replaced (`timesteps`): strictly decreasing, each in
[0, num_train_timesteps); alphas_cumprod is read at the new timesteps, and recipes that start
like diffusers' trailing-spacing Euler schedulers take initial_noise_scale from the first one.
"""

import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

from tools import bundle_files
from tools.sd15 import schedule

SD15 = "sd15"
SDXL = "sdxl"
FAMILY_NAMES = {SD15: "SD1.5", SDXL: "SDXL"}
DMD2_SD15_TIMESTEP = 999
DMD2_SDXL_1STEP_TIMESTEP = 399
LIGHTNING_STEPS = (2, 4, 8)
# diffusers' Euler schedulers start at sigma_max (not sqrt(sigma_max^2 + 1)) with these spacings.
SIGMA_MAX_START_SPACINGS = ("trailing", "linspace")


class RecipeError(ValueError):
    """An unknown recipe or arguments it cannot use."""


class Plan(NamedTuple):
    """What a recipe decides: timesteps, step mode, guidance, and whether sampling starts at
    sigma_max like diffusers' Euler schedulers with trailing spacing (initial_noise_scale
    sqrt(1 - alphas_cumprod[first timestep]))."""
    timesteps: List[int]
    step_mode: str = "ddim"
    guidance: float = 1.0
    sigma_max_start: bool = False


class Recipe(NamedTuple):
    """A recipe's manifest fields (prediction_type, schedule, guidance_scale), the default bundle
    name and a short description for ListModels."""
    fields: Dict[str, Any]
    name: str
    description: str


def _fixed(recipe: str, steps: Optional[int], guidance: Optional[float], want_steps: int) -> None:
    """Distilled recipes have their step count and no guidance."""
    if steps not in (None, want_steps) or guidance not in (None, 1.0):
        what = "one step" if want_steps == 1 else f"{want_steps} steps"
        raise RecipeError(f"{recipe} is {what} without guidance: do not pass --steps or "
                          "--guidance")


def dmd2_sd15_1step(cfg: Dict[str, Any], steps: Optional[int],
                    guidance: Optional[float]) -> Plan:
    """DMD2's one-step SD1.5 generator: tianweiy/DMD2 README (conditioning timestep 999)."""
    _fixed("dmd2-sd15-1step", steps, guidance, 1)
    return Plan([DMD2_SD15_TIMESTEP])


def dmd2_sdxl_4step(cfg: Dict[str, Any], steps: Optional[int],
                    guidance: Optional[float]) -> Plan:
    """DMD2's four-step SDXL generator (tianweiy/DMD2: README's diffusers usage with
    LCMScheduler, timesteps=[999, 749, 499, 249], guidance_scale=0; main/sdxl/test_folder_sdxl.py
    sample()): x0 at each timestep, fresh noise to the next (DDIMScheduler.add_noise).
    LCMScheduler's boundary-condition scalings differ from 1 and 0 by < 1e-7 here."""
    _fixed("dmd2-sdxl-4step", steps, guidance, 4)
    return Plan(schedule.dmd2_timesteps(4), step_mode="renoise")


def dmd2_sdxl_1step(cfg: Dict[str, Any], steps: Optional[int],
                    guidance: Optional[float]) -> Plan:
    """DMD2's one-step SDXL generator (tianweiy/DMD2 README: --conditioning_timestep 399,
    diffusers usage timesteps=[399], checkpoint dmd2_sdxl_1step_unet_fp16.bin; not 999 as for
    its SD1.5 model)."""
    _fixed("dmd2-sdxl-1step", steps, guidance, 1)
    return Plan([DMD2_SDXL_1STEP_TIMESTEP])


def sdxl_turbo(cfg: Dict[str, Any], steps: Optional[int], guidance: Optional[float]) -> Plan:
    """SDXL-Turbo (diffusers' SDXL Turbo docs: guidance_scale=0.0, num_inference_steps=1;
    stabilityai/sdxl-turbo scheduler/scheduler_config.json: EulerAncestralDiscreteScheduler,
    timestep_spacing "trailing"): one step at t = 999, starting at init_noise_sigma = sigma_max.
    More steps would be ancestral (stochastic) Euler, which dmdserve's loop does not have."""
    _fixed("sdxl-turbo", steps, guidance, 1)
    return Plan(schedule.ddim_timesteps({"timestep_spacing": "trailing",
                                         "num_train_timesteps": _total(cfg)}, 1),
                sigma_max_start=True)


def sdxl_lightning(cfg: Dict[str, Any], steps: Optional[int],
                   guidance: Optional[float]) -> Plan:
    """SDXL-Lightning (ByteDance/SDXL-Lightning model card: EulerDiscreteScheduler with
    timestep_spacing="trailing", guidance_scale=0, as many steps as the checkpoint's name):
    2 steps [999, 499], 4 [999, 749, 499, 249], 8 [999, 874, ..., 124], deterministic Euler from
    sigma_max. Its 1-step UNet predicts x0 and is not supported."""
    if steps not in LIGHTNING_STEPS:
        got = "none was given" if steps is None else f"got {steps}"
        raise RecipeError(f"sdxl-lightning needs --steps 2, 4 or 8, the step count of the "
                          f"SDXL-Lightning UNet (its 1-step UNet predicts x0 and is not "
                          f"supported); {got}")
    if guidance not in (None, 1.0):
        raise RecipeError("sdxl-lightning has no guidance: do not pass --guidance")
    return Plan(schedule.ddim_timesteps({"timestep_spacing": "trailing",
                                         "num_train_timesteps": _total(cfg)}, steps),
                sigma_max_start=True)


def ddim(cfg: Dict[str, Any], steps: Optional[int], guidance: Optional[float],
         family: str) -> Plan:
    """An ordinary checkpoint (the teacher) with deterministic DDIM / Euler and classifier-free
    guidance; defaults: 50 steps (both pipelines'), guidance 7.5 (SD1.5) or 5.0 (SDXL,
    StableDiffusionXLPipeline's default). For SDXL's Euler scheduler configs with trailing or
    linspace spacing, diffusers starts at sigma_max (initial_noise_scale below 1)."""
    steps = 50 if steps is None else steps
    guidance = (7.5 if family == SD15 else 5.0) if guidance is None else guidance
    if guidance < 1.0:
        raise RecipeError(f"guidance must be >= 1, got {guidance}")
    euler = str(cfg.get("_class_name", "")).startswith("Euler")
    start = (family == SDXL and euler
             and cfg.get("timestep_spacing", "leading") in SIGMA_MAX_START_SPACINGS)
    return Plan(schedule.ddim_timesteps(cfg, steps), guidance=guidance, sigma_max_start=start)


RECIPE_FUNCTIONS: Dict[str, Callable[..., Plan]] = {
    "dmd2-sd15-1step": dmd2_sd15_1step,
    "dmd2-sdxl-4step": dmd2_sdxl_4step,
    "dmd2-sdxl-1step": dmd2_sdxl_1step,
    "sdxl-turbo": sdxl_turbo,
    "sdxl-lightning": sdxl_lightning,
}
# recipe -> the families it applies to ("ddim" applies to both).
FAMILIES = {"dmd2-sd15-1step": (SD15,), "dmd2-sdxl-4step": (SDXL,), "dmd2-sdxl-1step": (SDXL,),
            "sdxl-turbo": (SDXL,), "sdxl-lightning": (SDXL,), "ddim": (SD15, SDXL)}
RECIPES = tuple(FAMILIES)


def _total(cfg: Dict[str, Any]) -> int:
    return int(cfg.get("num_train_timesteps", 1000))


def check_family(recipe: str, family: str, folder: str = "the folder") -> None:
    """Fails when `recipe` is unknown or not meant for a `family` ("sd15"/"sdxl") checkpoint."""
    if recipe not in FAMILIES:
        raise RecipeError(f"unknown recipe {recipe!r} (known: {', '.join(RECIPES)})")
    if family not in FAMILIES[recipe]:
        wanted = " or ".join(FAMILY_NAMES[f] for f in FAMILIES[recipe])
        known = [r for r in RECIPES if family in FAMILIES[r]]
        raise RecipeError(f"recipe {recipe} is for {wanted} checkpoints, but {folder} is an "
                          f"{FAMILY_NAMES[family]} pipeline (its recipes: {', '.join(known)})")


def check_timesteps(timesteps: Sequence[int], total: int) -> List[int]:
    """A --timesteps list: non-empty, strictly decreasing, each in [0, total)."""
    ts = list(timesteps)
    if not ts:
        raise RecipeError("--timesteps: the list is empty")
    for t in ts:
        if not 0 <= t < total:
            raise RecipeError(f"--timesteps: timestep {t} is outside [0, {total}) (the "
                              "scheduler's training timesteps)")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise RecipeError(f"--timesteps: {ts} must be strictly decreasing")
    return ts


def plan(recipe: str, family: str, cfg: Dict[str, Any], steps: Optional[int] = None,
         guidance: Optional[float] = None,
         timesteps: Optional[Sequence[int]] = None) -> Plan:
    """The Plan of `recipe` for a `family` checkpoint with scheduler config `cfg`. steps and
    guidance: None for the recipe's defaults. timesteps: replaces the recipe's list (with
    steps, their count must agree)."""
    check_family(recipe, family)
    if timesteps is not None:
        ts = check_timesteps(timesteps, _total(cfg))
        if steps is not None and steps != len(ts):
            raise RecipeError(f"--steps {steps} disagrees with the {len(ts)} --timesteps {ts}")
        # The list replaces the recipe's own: plan with the step count whose list it replaces.
        steps = {"ddim": len(ts), "sdxl-lightning": 4}.get(recipe)
    if recipe == "ddim":
        result = ddim(cfg, steps, guidance, family)
    else:
        result = RECIPE_FUNCTIONS[recipe](cfg, steps, guidance)
    if timesteps is not None:
        result = result._replace(timesteps=list(timesteps))
    return result


def fields(result: Plan, cfg: Dict[str, Any], recipe: str) -> Dict[str, Any]:
    """The manifest fields prediction_type, schedule (with initial_noise_scale when the plan
    starts at sigma_max) and guidance_scale of a Plan on the scheduler config `cfg`."""
    prediction = cfg.get("prediction_type", "epsilon")
    if recipe != "ddim" and prediction != "epsilon":
        raise RecipeError(f"{recipe} needs an epsilon-prediction scheduler config, got "
                          f"prediction_type {prediction!r}")
    if prediction not in ("epsilon", "sample"):
        raise RecipeError(f"prediction_type {prediction!r} is not supported by dmdserve bundles "
                          "(epsilon or sample)")
    alphas = schedule.alphas_cumprod(cfg)
    if max(result.timesteps) >= len(alphas):
        raise RecipeError(f"timestep {max(result.timesteps)} is outside the scheduler's "
                          f"{len(alphas)} training timesteps")
    block = bundle_files.manifest_schedule(result.timesteps, alphas, result.step_mode)
    if result.sigma_max_start:
        block["initial_noise_scale"] = math.sqrt(1.0 - float(alphas[result.timesteps[0]]))
    return {"prediction_type": prediction, "schedule": block,
            "guidance_scale": float(result.guidance)}


def build(recipe: str, family: str, cfg: Dict[str, Any], steps: Optional[int] = None,
          guidance: Optional[float] = None,
          timesteps: Optional[Sequence[int]] = None) -> Recipe:
    """`recipe`'s manifest fields, default name and description for a `family` checkpoint."""
    result = plan(recipe, family, cfg, steps, guidance, timesteps)
    n = len(result.timesteps)
    custom = " (custom timesteps)" if timesteps is not None else ""
    if recipe == "ddim":
        prefix = "sd15" if family == SD15 else "sdxl"
        method = "DDIM" if family == SD15 else "Euler (deterministic)"
        name = f"{prefix}-ddim{n}"
        what = (f"{FAMILY_NAMES[family]}, {n}-step {method}, guidance {result.guidance:g}"
                + custom)
    else:
        names = {"dmd2-sd15-1step": ("dmd2-sd15", "DMD2 one-step SD1.5"),
                 "dmd2-sdxl-4step": ("dmd2-sdxl-4step", "DMD2 four-step SDXL"),
                 "dmd2-sdxl-1step": ("dmd2-sdxl-1step", "DMD2 one-step SDXL"),
                 "sdxl-turbo": ("sdxl-turbo", "SDXL-Turbo, one step"),
                 "sdxl-lightning": (f"sdxl-lightning-{n}step", f"SDXL-Lightning, {n} steps")}
        name, what = names[recipe]
        what += custom
    return Recipe(fields(result, cfg, recipe), name, what)


def schedule_fields(recipe: str, scheduler_config: Dict[str, Any], steps: int,
                    guidance: float) -> Dict[str, Any]:
    """The manifest fields prediction_type, schedule and guidance_scale of an SD1.5 `recipe`
    (dmd2-sd15-1step or ddim) with explicit steps and guidance."""
    return build(recipe, SD15, scheduler_config, steps, guidance).fields
