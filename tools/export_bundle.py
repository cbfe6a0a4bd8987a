#!/usr/bin/python3
"""Exports a diffusers-format SD1.5 or SDXL checkpoint folder as a dmdserve bundle.

  /usr/bin/python3 tools/export_bundle.py --diffusers-dir sd15 \
      --unet-checkpoint dmd2/pytorch_model.bin --recipe dmd2-sd15-1step --out models/dmd2-sd15

  /usr/bin/python3 tools/export_bundle.py --diffusers-dir sd15 --recipe ddim --steps 25 \
      --guidance 7.5 --out models/sd15-ddim25

  /usr/bin/python3 tools/export_bundle.py --diffusers-dir sdxl-base \
      --unet-checkpoint dmd2_sdxl_4step_unet_fp16.bin --recipe dmd2-sdxl-4step \
      --dtype float16 --out models/dmd2-sdxl-4step

Recipes (tools/sd15/recipes.py): for SD1.5 folders (dmdserve.bundle/v1, docs/SD15.md)
dmd2-sd15-1step (t = 999, epsilon, no guidance) and ddim --steps N --guidance G; for SDXL
folders (dmdserve.bundle/v2, docs/SDXL.md) dmd2-sdxl-4step, dmd2-sdxl-1step, sdxl-turbo,
sdxl-lightning --steps 2|4|8 and ddim --steps N --guidance G; --timesteps replaces any recipe's
timesteps. The UNet, VAE decoder and text encoder(s) are rebuilt from the folder's configs,
loaded with strict key matching and saved as TorchScript; the tokenizer files are copied from
the folder's tokenizer/ (and tokenizer_2/ when its files differ).
"""

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.sd15 import bundle, recipes  # noqa: E402
from tools.sd15.clip_text import SDXLTextEncoders  # noqa: E402
from tools.sd15.checkpoint_io import CheckpointError  # noqa: E402
from tools.sd15.config import ConfigError, vae_downsample_factor  # noqa: E402
from tools.sd15.diffusers_folder import DiffusersFolder, FolderError  # noqa: E402
from tools.sd15.schedule import ScheduleError  # noqa: E402
from tools.sd15.sdxl_folder import SDXLFolder, is_sdxl_folder  # noqa: E402

ERRORS = (bundle.BundleError, CheckpointError, ConfigError, FolderError, recipes.RecipeError,
          ScheduleError)


def parse_sizes(text: str) -> List[Tuple[int, int]]:
    """'512' or '512x512,768x512' -> [(w, h), ...]."""
    sizes = []
    for item in text.split(","):
        w, sep, h = item.strip().lower().partition("x")
        try:
            sizes.append((int(w), int(h if sep else w)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad size {item!r} (expected N or WxH)") from None
    return sizes


def parse_ints(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad list {text!r} (expected e.g. 1,2,4)") from None


def add_bundle_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared with make_random_bundle.py."""
    parser.add_argument("--out", required=True, help="bundle directory to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out even if it is not empty")
    parser.add_argument("--name", help="model name in the API (default: from the recipe)")
    parser.add_argument("--description", help="free text for ListModels")
    parser.add_argument("--sizes", "--size", type=parse_sizes,
                        help="supported image sizes, default first: 512 or 512x512,768x512 "
                             "(default: the UNet's sample_size times the VAE factor, square)")
    parser.add_argument("--dtype", choices=sorted(bundle.DTYPES), default="float32",
                        help="dtype the components run in (CPU libtorch 1.13 has no float16 "
                             "convolutions: float16 is for GPUs)")
    parser.add_argument("--decoder-dtype", choices=sorted(bundle.DTYPES),
                        help="override --dtype for the VAE decoder (default: --dtype for SD1.5; "
                             "float32 for SDXL, whose VAE overflows in float16, unless its "
                             "config says force_upcast false)")
    parser.add_argument("--batch-sizes", type=parse_ints, default=[1, 2, 4, 8],
                        help="batch sizes to warm up and run, strictly increasing (default "
                             "1,2,4,8; the server warms every size at every batch size)")
    parser.add_argument("--max-images-per-request", type=int,
                        help="default: the largest batch size")


def build_manifest(args: argparse.Namespace, u: dict, v: dict, tokenizer: dict,
                   schedule_fields: dict, default_name: str, default_description: str,
                   decoder_dtype: Optional[str] = None, **kwargs: Any) -> dict:
    """model.json from the shared options and the resolved UNet (u) and VAE (v) configs.
    decoder_dtype: the decoder's dtype when --decoder-dtype is not given (default --dtype);
    kwargs: bundle.manifest's components and v2_fields."""
    factor = vae_downsample_factor(v)
    if args.sizes:
        sizes = args.sizes
    elif u["sample_size"]:
        sizes = [(u["sample_size"] * factor, u["sample_size"] * factor)]
    else:
        raise bundle.BundleError("the UNet config has no sample_size: pass --sizes")
    dtypes = {"text_encoder": args.dtype, "generator": args.dtype,
              "decoder": args.decoder_dtype or decoder_dtype or args.dtype}
    return bundle.manifest(
        name=args.name or default_name,
        description=args.description or default_description,
        sizes=sizes, image_channels=v["out_channels"], latent_channels=u["in_channels"],
        downsample_factor=factor, tokenizer=tokenizer, schedule_fields=schedule_fields,
        latent_scaling_factor=float(v["scaling_factor"]), dtypes=dtypes,
        batch_sizes=args.batch_sizes,
        max_images_per_request=args.max_images_per_request or max(args.batch_sizes), **kwargs)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def source_name(args: argparse.Namespace) -> str:
    return os.path.basename(os.path.abspath(args.unet_checkpoint or args.diffusers_dir))


def loading_message(args: argparse.Namespace, path: str) -> str:
    return f"loading {path}" + (f" with UNet {args.unet_checkpoint}"
                                if args.unet_checkpoint else "")


def export_sd15(args: argparse.Namespace, started: float) -> dict:
    """An SD1.5 folder as a dmdserve.bundle/v1 bundle."""
    folder = DiffusersFolder.open(args.diffusers_dir, args.unet_checkpoint)
    recipe = recipes.build(args.recipe, recipes.SD15, folder.scheduler_config, args.steps,
                           args.guidance, args.timesteps)
    tokenizer = folder.tokenizer_settings()
    bundle.check_output(args.out, folder.tokenizer_dir, args.overwrite)
    bundle.check_tokenizer(folder.tokenizer_dir, tokenizer)
    model_json = build_manifest(args, folder.unet_config, folder.vae_config, tokenizer,
                                recipe.fields, recipe.name,
                                f"{recipe.description} (exported from {source_name(args)})")
    log(loading_message(args, folder.path))
    modules = {"text_encoder": folder.load_text_encoder(),
               "generator": folder.load_unet(),
               "decoder": folder.load_vae_decoder()}
    log(f"loaded in {time.monotonic() - started:.1f} s; writing {args.out}")
    bundle.write(args.out, modules, model_json, folder.tokenizer_dir, args.overwrite)
    return model_json


def sdxl_v2_fields(folder: SDXLFolder) -> Dict[str, Any]:
    """The dmdserve.bundle/v2 fields of an SDXL folder: tokenizer_2 (pad "!"), text_time
    conditioning, and zero unconditional embeddings when model_index.json forces them."""
    dirs = folder.tokenizer_dirs
    settings = folder.tokenizer_settings("tokenizer")
    settings_2 = folder.tokenizer_settings("tokenizer_2")
    bundle.check_tokenizer(dirs["tokenizer"], settings)
    bundle.check_tokenizer(dirs["tokenizer_2"], settings_2)
    return {"tokenizer_2": bundle.tokenizer_2_block(dirs["tokenizer"], dirs["tokenizer_2"],
                                                    settings, settings_2),
            "conditioning": "text_time",
            "unconditional": "zeros" if folder.force_zeros_for_empty_prompt else "empty_prompt"}


def export_sdxl(args: argparse.Namespace, started: float) -> dict:
    """An SDXL folder as a dmdserve.bundle/v2 bundle. The decoder runs in float32 unless
    --decoder-dtype says otherwise or the VAE config has force_upcast false (SDXL's VAE
    overflows in float16; diffusers upcasts it)."""
    folder = SDXLFolder.open(args.diffusers_dir, args.unet_checkpoint)
    recipe = recipes.build(args.recipe, recipes.SDXL, folder.scheduler_config, args.steps,
                           args.guidance, args.timesteps)
    dirs = folder.tokenizer_dirs
    bundle.check_output(args.out, dirs["tokenizer"], args.overwrite, dirs["tokenizer_2"])
    model_json = build_manifest(
        args, folder.unet_config, folder.vae_config, folder.tokenizer_settings("tokenizer"),
        recipe.fields, recipe.name, f"{recipe.description} (exported from {source_name(args)})",
        decoder_dtype="float32" if folder.vae_force_upcast else None,
        components=bundle.SDXL_COMPONENT_FILES, v2_fields=sdxl_v2_fields(folder))
    log(loading_message(args, folder.path))
    modules = {"text_encoder": SDXLTextEncoders(folder.load_text_encoder(),
                                                folder.load_text_encoder_2()),
               "generator": folder.load_unet(),
               "decoder": folder.load_vae_decoder()}
    log(f"loaded in {time.monotonic() - started:.1f} s; writing {args.out}")
    bundle.write(args.out, modules, model_json, dirs["tokenizer"], args.overwrite,
                 dirs["tokenizer_2"])
    return model_json


def export(args: argparse.Namespace) -> None:
    started = time.monotonic()
    sdxl = is_sdxl_folder(args.diffusers_dir)
    recipes.check_family(args.recipe, recipes.SDXL if sdxl else recipes.SD15,
                         args.diffusers_dir)
    model_json = (export_sdxl if sdxl else export_sd15)(args, started)
    log(f"wrote {args.out} ({model_json['name']}, recipe {args.recipe}) in "
        f"{time.monotonic() - started:.1f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--diffusers-dir", required=True,
                        help="diffusers-format SD1.5 folder (model_index.json, unet/, vae/, "
                             "text_encoder/, tokenizer/, scheduler/) or SDXL folder (also "
                             "text_encoder_2/, tokenizer_2/)")
    parser.add_argument("--unet-checkpoint",
                        help="UNet state dict (.safetensors/.bin) replacing unet/'s weights, "
                             "e.g. DMD2's pytorch_model.bin or dmd2_sdxl_4step_unet_fp16.bin")
    parser.add_argument("--recipe", required=True, choices=recipes.RECIPES,
                        help="sampling recipe (see docs/SD15.md and docs/SDXL.md)")
    parser.add_argument("--steps", type=int,
                        help="ddim: sampling steps (default 50); sdxl-lightning: 2, 4 or 8, "
                             "the UNet's step count (required)")
    parser.add_argument("--guidance", type=float,
                        help="ddim: classifier-free guidance scale (default 7.5 for SD1.5, 5.0 "
                             "for SDXL; 1 = off)")
    parser.add_argument("--timesteps", type=parse_ints,
                        help="replace the recipe's timesteps, e.g. 999,499: strictly "
                             "decreasing, each below the scheduler's num_train_timesteps")
    add_bundle_arguments(parser)
    args = parser.parse_args(argv)
    try:
        export(args)
    except ERRORS as e:
        print(f"export_bundle: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
