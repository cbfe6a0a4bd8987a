#!/usr/bin/python3
"""Builds an SD1.5- or SDXL-architecture dmdserve bundle with random weights, for performance work.

  /usr/bin/python3 tools/make_random_bundle.py --arch sd15 --size 512 --batch-sizes 1 \
      --out /tmp/sd15-random

  /usr/bin/python3 tools/make_random_bundle.py --arch sdxl --size 1024 --batch-sizes 1 \
      --dtype float16 --out /tmp/sdxl-random

SD1.5: the full-size architecture (860M-parameter UNet, VAE decoder, CLIP ViT-L/14 text encoder:
about 4.1 GB in float32) and the dmd2-sd15-1step recipe, so it costs exactly what DMD2's one-step
SD1.5 model costs to serve. SDXL (dmdserve.bundle/v2): SDXL base 1.0's architecture (2.6B UNet,
both text encoders, VAE decoder: about 14 GB of float32 weights, built in RAM before --dtype)
and dmd2-sdxl-1step by default (--recipe: another SDXL recipe that needs only the scheduler
config); its VAE decoder stays float32 unless --decoder-dtype says otherwise, as exports do. The
images are noise. The weights are PyTorch's default initialisation, seeded with --seed.
--config-dir takes the configs from a diffusers-format folder instead of the built-in ones (its
weights are not read), e.g. a tiny folder for tests.
"""

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tools import export_bundle  # noqa: E402
from tools.sd15 import bundle, recipes, sd15_configs, sdxl_configs  # noqa: E402
from tools.sd15.clip_text import (CLIPTextModel, CLIPTextModelWithProjection,  # noqa: E402
                                  SDXLTextEncoders)
from tools.sd15.config import resolve_text, resolve_unet, resolve_vae  # noqa: E402
from tools.sd15.diffusers_folder import DEFAULT_SPECIAL_TOKENS  # noqa: E402
from tools.sd15.unet import UNet2DConditionModel  # noqa: E402
from tools.sd15.vae import VAEDecoder  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = {"unet": "unet/config.json", "vae": "vae/config.json",
                "text_encoder": "text_encoder/config.json",
                "scheduler": "scheduler/scheduler_config.json"}


SDXL_CONFIG_FILES = {**CONFIG_FILES, "text_encoder_2": "text_encoder_2/config.json"}
SDXL_RECIPES = ("dmd2-sdxl-1step", "dmd2-sdxl-4step", "sdxl-turbo", "sdxl-lightning")


def load_configs(config_dir: str, arch: str = "sd15") -> dict:
    if not config_dir:
        if arch == "sdxl":
            return {"unet": sdxl_configs.UNET, "vae": sdxl_configs.VAE,
                    "text_encoder": sdxl_configs.TEXT_ENCODER,
                    "text_encoder_2": sdxl_configs.TEXT_ENCODER_2,
                    "scheduler": sdxl_configs.SCHEDULER}
        return {"unet": sd15_configs.UNET, "vae": sd15_configs.VAE,
                "text_encoder": sd15_configs.TEXT_ENCODER, "scheduler": sd15_configs.SCHEDULER}
    configs = {}
    for name, rel in (SDXL_CONFIG_FILES if arch == "sdxl" else CONFIG_FILES).items():
        path = os.path.join(config_dir, rel)
        try:
            with open(path, encoding="utf-8") as f:
                configs[name] = json.load(f)
        except (OSError, ValueError) as e:
            raise bundle.BundleError(f"{path}: cannot read config: {e}") from e
    return configs


def make(args: argparse.Namespace) -> None:
    if args.arch == "sdxl":
        make_sdxl(args)
        return
    if args.recipe not in (None, "dmd2-sd15-1step") or args.steps is not None:
        raise recipes.RecipeError("--arch sd15 has the dmd2-sd15-1step recipe only: do not "
                                  "pass --recipe or --steps")
    started = time.monotonic()
    configs = load_configs(args.config_dir)
    u, v, t = (resolve_unet(configs["unet"]), resolve_vae(configs["vae"]),
               resolve_text(configs["text_encoder"]))
    fields = recipes.schedule_fields("dmd2-sd15-1step", configs["scheduler"], 1, 1.0)
    tokenizer = dict(DEFAULT_SPECIAL_TOKENS, max_length=t["max_position_embeddings"])
    bundle.check_output(args.out, args.tokenizer_dir, args.overwrite)
    bundle.check_tokenizer(args.tokenizer_dir, tokenizer)
    model_json = export_bundle.build_manifest(
        args, u, v, tokenizer, fields, f"{args.arch}-random",
        f"{args.arch.upper()} architecture with random weights (seed {args.seed}), DMD2 one-step "
        "recipe: for performance work, its images are noise")
    torch.manual_seed(args.seed)
    modules = {"text_encoder": CLIPTextModel(t), "generator": UNet2DConditionModel(u),
               "decoder": VAEDecoder(v)}
    write(args, modules, model_json, started)


def make_sdxl(args: argparse.Namespace) -> None:
    """The SDXL architecture as a dmdserve.bundle/v2 bundle (tokenizer_2 = the same BPE files
    padded with "!", text_time conditioning, zero unconditional input)."""
    started = time.monotonic()
    recipe_name = args.recipe or "dmd2-sdxl-1step"
    if recipe_name not in SDXL_RECIPES:
        raise recipes.RecipeError(f"--arch sdxl: --recipe must be one of "
                                  f"{', '.join(SDXL_RECIPES)}, got {recipe_name}")
    configs = load_configs(args.config_dir, "sdxl")
    u, v = resolve_unet(configs["unet"], "sdxl"), resolve_vae(configs["vae"])
    t, t2 = resolve_text(configs["text_encoder"]), resolve_text(configs["text_encoder_2"])
    recipe = recipes.build(recipe_name, recipes.SDXL, configs["scheduler"], args.steps)
    tokenizer = dict(DEFAULT_SPECIAL_TOKENS, max_length=t["max_position_embeddings"])
    tokenizer_2 = dict(tokenizer, pad_token="!")
    bundle.check_output(args.out, args.tokenizer_dir, args.overwrite)
    bundle.check_tokenizer(args.tokenizer_dir, tokenizer)
    bundle.check_tokenizer(args.tokenizer_dir, tokenizer_2)
    v2_fields = {"tokenizer_2": bundle.tokenizer_2_block(args.tokenizer_dir, args.tokenizer_dir,
                                                         tokenizer, tokenizer_2),
                 "conditioning": "text_time", "unconditional": "zeros"}
    model_json = export_bundle.build_manifest(
        args, u, v, tokenizer, recipe.fields, "sdxl-random",
        f"SDXL architecture with random weights (seed {args.seed}), {recipe.description} "
        "recipe: for performance work, its images are noise",
        decoder_dtype="float32", components=bundle.SDXL_COMPONENT_FILES, v2_fields=v2_fields)
    torch.manual_seed(args.seed)
    modules = {"text_encoder": SDXLTextEncoders(CLIPTextModel(t), CLIPTextModelWithProjection(t2)),
               "generator": UNet2DConditionModel(u), "decoder": VAEDecoder(v)}
    write(args, modules, model_json, started)


def write(args: argparse.Namespace, modules: dict, model_json: dict, started: float) -> None:
    params = sum(p.numel() for m in modules.values() for p in m.parameters())
    export_bundle.log(f"built {params / 1e6:.1f}M random parameters in "
                      f"{time.monotonic() - started:.1f} s; writing {args.out}")
    bundle.write(args.out, modules, model_json, args.tokenizer_dir, args.overwrite)
    export_bundle.log(f"wrote {args.out} in {time.monotonic() - started:.1f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15", help="architecture")
    parser.add_argument("--config-dir",
                        help="diffusers-format folder whose unet/, vae/, text_encoder/ "
                             "(sdxl: and text_encoder_2/) and scheduler/ configs replace the "
                             "built-in ones")
    parser.add_argument("--recipe",
                        help=f"sdxl: one of {', '.join(SDXL_RECIPES)} (default "
                             "dmd2-sdxl-1step); sd15: dmd2-sd15-1step only")
    parser.add_argument("--steps", type=int, help="sdxl-lightning: 2, 4 or 8")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--tokenizer-dir",
                        default=os.path.join(REPO_ROOT, "models", "tokenizers", "openai-clip"),
                        help="folder with the CLIP vocab.json and merges.txt to copy")
    export_bundle.add_bundle_arguments(parser)
    args = parser.parse_args(argv)
    try:
        make(args)
    except export_bundle.ERRORS as e:
        print(f"make_random_bundle: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
