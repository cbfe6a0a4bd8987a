#!/usr/bin/python3
"""Exports a diffusers-format SD1.5 checkpoint folder as a dmdserve bundle (docs/SD15.md).

  /usr/bin/python3 tools/export_bundle.py --diffusers-dir sd15 \
      --unet-checkpoint dmd2/pytorch_model.bin --recipe dmd2-sd15-1step --out models/dmd2-sd15

  /usr/bin/python3 tools/export_bundle.py --diffusers-dir sd15 --recipe ddim --steps 25 \
      --guidance 7.5 --out models/sd15-ddim25

Recipes (tools/sd15/recipes.py): dmd2-sd15-1step (t = 999, epsilon, no guidance) for DMD2's
one-step generator, ddim --steps N --guidance G for an ordinary SD1.5 checkpoint. The UNet, VAE
decoder and text encoder are rebuilt from the folder's configs, loaded with strict key matching
and saved as TorchScript; the tokenizer files are copied from the folder's tokenizer/.
"""

import argparse
import os
import sys
import time
from typing import List, Tuple

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.sd15 import bundle, recipes  # noqa: E402
from tools.sd15.checkpoint_io import CheckpointError  # noqa: E402
from tools.sd15.config import ConfigError, vae_downsample_factor  # noqa: E402
from tools.sd15.diffusers_folder import DiffusersFolder, FolderError  # noqa: E402
from tools.sd15.schedule import ScheduleError  # noqa: E402
from tools.sd15.sdxl_folder import is_sdxl_folder  # noqa: E402

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
                        help="override --dtype for the VAE decoder")
    parser.add_argument("--batch-sizes", type=parse_ints, default=[1, 2, 4, 8],
                        help="batch sizes to warm up and run, strictly increasing (default "
                             "1,2,4,8; the server warms every size at every batch size)")
    parser.add_argument("--max-images-per-request", type=int,
                        help="default: the largest batch size")


def build_manifest(args: argparse.Namespace, u: dict, v: dict, tokenizer: dict,
                   schedule_fields: dict, default_name: str, default_description: str) -> dict:
    """model.json from the shared options and the resolved UNet (u) and VAE (v) configs."""
    factor = vae_downsample_factor(v)
    if args.sizes:
        sizes = args.sizes
    elif u["sample_size"]:
        sizes = [(u["sample_size"] * factor, u["sample_size"] * factor)]
    else:
        raise bundle.BundleError("the UNet config has no sample_size: pass --sizes")
    dtypes = {"text_encoder": args.dtype, "generator": args.dtype,
              "decoder": args.decoder_dtype or args.dtype}
    return bundle.manifest(
        name=args.name or default_name,
        description=args.description or default_description,
        sizes=sizes, image_channels=v["out_channels"], latent_channels=u["in_channels"],
        downsample_factor=factor, tokenizer=tokenizer, schedule_fields=schedule_fields,
        latent_scaling_factor=float(v["scaling_factor"]), dtypes=dtypes,
        batch_sizes=args.batch_sizes,
        max_images_per_request=args.max_images_per_request or max(args.batch_sizes))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def export(args: argparse.Namespace) -> None:
    started = time.monotonic()
    if is_sdxl_folder(args.diffusers_dir):
        raise FolderError(
            f"{args.diffusers_dir} is an SDXL pipeline (StableDiffusionXLPipeline): exporting "
            "SDXL bundles is not supported yet (tools/sd15/sdxl_folder.py loads its models, but "
            "there is no SDXL bundle layout, manifest or recipe); export an SD1.5 folder")
    folder = DiffusersFolder.open(args.diffusers_dir, args.unet_checkpoint)
    if args.recipe == "dmd2-sd15-1step":
        steps = 1 if args.steps is None else args.steps
        guidance = 1.0 if args.guidance is None else args.guidance
        name, what = "dmd2-sd15", "DMD2 one-step SD1.5"
    else:
        steps = 50 if args.steps is None else args.steps
        guidance = 7.5 if args.guidance is None else args.guidance
        name, what = f"sd15-ddim{steps}", f"SD1.5, {steps}-step DDIM, guidance {guidance:g}"
    fields = recipes.schedule_fields(args.recipe, folder.scheduler_config, steps, guidance)
    tokenizer = folder.tokenizer_settings()
    bundle.check_output(args.out, folder.tokenizer_dir, args.overwrite)
    bundle.check_tokenizer(folder.tokenizer_dir, tokenizer)
    source = os.path.basename(os.path.abspath(args.unet_checkpoint or args.diffusers_dir))
    model_json = build_manifest(args, folder.unet_config, folder.vae_config, tokenizer, fields,
                                name, f"{what} (exported from {source})")
    log(f"loading {folder.path}" + (f" with UNet {args.unet_checkpoint}"
                                    if args.unet_checkpoint else ""))
    modules = {"text_encoder": folder.load_text_encoder(),
               "generator": folder.load_unet(),
               "decoder": folder.load_vae_decoder()}
    log(f"loaded in {time.monotonic() - started:.1f} s; writing {args.out}")
    bundle.write(args.out, modules, model_json, folder.tokenizer_dir, args.overwrite)
    log(f"wrote {args.out} ({model_json['name']}, recipe {args.recipe}) in "
        f"{time.monotonic() - started:.1f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--diffusers-dir", required=True,
                        help="diffusers-format SD1.5 folder (model_index.json, unet/, vae/, "
                             "text_encoder/, tokenizer/, scheduler/)")
    parser.add_argument("--unet-checkpoint",
                        help="UNet state dict (.safetensors/.bin) replacing unet/'s weights, "
                             "e.g. DMD2's pytorch_model.bin")
    parser.add_argument("--recipe", required=True, choices=recipes.RECIPES,
                        help="sampling recipe (see docs/SD15.md)")
    parser.add_argument("--steps", type=int, help="ddim: sampling steps (default 50)")
    parser.add_argument("--guidance", type=float,
                        help="ddim: classifier-free guidance scale (default 7.5; 1 = off)")
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
