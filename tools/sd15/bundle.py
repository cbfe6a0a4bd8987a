"""Writing SD1.5-architecture models as a dmdserve bundle (docs/BUNDLE.md, dmdserve.bundle/v1).

The three modules are saved with torch.jit.script by the installed torch (1.13 here) and match
the bundle's TorchScript contracts as they are:
  text_encoder.pt  CLIPTextModel:        input_ids int64[B, L] -> float[B, L, D]
  unet.pt          UNet2DConditionModel: (sample, timestep int64[B], states) -> epsilon
  vae_decoder.pt   VAEDecoder:           latents / scaling_factor -> image in [-1, 1]
Weights are stored in each component's dtype (the pipeline converts to the manifest's dtype at
load anyway; storing them converted halves a float16 bundle's size).
"""

import json
import os
import re
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from tools import bundle_files

FORMAT = "dmdserve.bundle/v1"
COMPONENT_FILES = {"text_encoder": "text_encoder.pt", "generator": "unet.pt",
                   "decoder": "vae_decoder.pt"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
OPTIONAL_TOKENIZER_FILES = ("LICENSE",)


class BundleError(ValueError):
    """Arguments that would make an invalid bundle; the message names the field and value."""


def check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise BundleError(f"name {name!r} must be 1-64 characters of [A-Za-z0-9._-]")


def check_batch_sizes(sizes: Sequence[int]) -> None:
    if not sizes or any(not 1 <= s <= 1024 for s in sizes) or list(sizes) != sorted(set(sizes)):
        raise BundleError(f"batch sizes {list(sizes)} must be strictly increasing, each 1-1024")


def check_image_sizes(sizes: Sequence[Tuple[int, int]], factor: int) -> None:
    if not sizes or len(set(sizes)) != len(sizes):
        raise BundleError(f"image sizes {list(sizes)} must be non-empty without duplicates")
    for w, h in sizes:
        if not (1 <= w <= 8192 and 1 <= h <= 8192) or w % factor or h % factor:
            raise BundleError(f"image size {w}x{h} must be 1-8192 pixels and divisible by the "
                              f"VAE's downsample factor {factor}")


def manifest(*, name: str, description: str, sizes: List[Tuple[int, int]], image_channels: int,
             latent_channels: int, downsample_factor: int, tokenizer: Dict[str, Any],
             schedule_fields: Dict[str, Any], latent_scaling_factor: float,
             dtypes: Dict[str, str], batch_sizes: List[int],
             max_images_per_request: int) -> Dict[str, Any]:
    """model.json for an SD-architecture bundle; sizes[0] is the default size."""
    check_name(name)
    check_batch_sizes(batch_sizes)
    check_image_sizes(sizes, downsample_factor)
    if not 1 <= max_images_per_request <= 1024:
        raise BundleError(f"max_images_per_request {max_images_per_request} must be 1-1024")
    dtype: Any = dtypes["generator"]
    if len(set(dtypes.values())) > 1:
        dtype = dict(dtypes)
    return {
        "format": FORMAT,
        "name": name,
        "description": description,
        "image": {"width": sizes[0][0], "height": sizes[0][1], "channels": image_channels,
                  "supported_sizes": [[w, h] for w, h in sizes]},
        "latent": {"channels": latent_channels, "downsample_factor": downsample_factor},
        "tokenizer": {"vocab": "tokenizer/vocab.json", "merges": "tokenizer/merges.txt",
                      **tokenizer},
        "components": dict(COMPONENT_FILES),
        **schedule_fields,
        "latent_scaling_factor": latent_scaling_factor,
        "dtype": dtype,
        "batch_sizes": list(batch_sizes),
        "max_images_per_request": max_images_per_request,
    }


def check_tokenizer(tokenizer_dir: str, settings: Dict[str, Any]) -> None:
    """The special tokens must be in vocab.json (the server's tokenizer looks them up)."""
    with open(os.path.join(tokenizer_dir, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    for key in ("bos_token", "eos_token", "pad_token"):
        if settings[key] not in vocab:
            raise BundleError(f"{tokenizer_dir}/vocab.json: {key} {settings[key]!r} is not in "
                              "the vocabulary")


def check_output(out_dir: str, tokenizer_dir: str, overwrite: bool) -> None:
    """Fails early (before minutes of model loading) on an output or tokenizer problem."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir)
                                    or os.listdir(out_dir) and not overwrite):
        raise BundleError(f"{out_dir}: exists and is not an empty directory (pass --overwrite "
                          "to write into a non-empty one)")
    for f in TOKENIZER_FILES:
        if not os.path.isfile(os.path.join(tokenizer_dir, f)):
            raise BundleError(f"{tokenizer_dir}: missing {f}")


def write(out_dir: str, modules: Dict[str, nn.Module], model_json: Dict[str, Any],
          tokenizer_dir: str, overwrite: bool = False) -> None:
    """Writes the bundle: TorchScript files (modules keyed by component name, converted to the
    manifest's dtypes), tokenizer files and model.json (written last)."""
    check_output(out_dir, tokenizer_dir, overwrite)
    os.makedirs(os.path.join(out_dir, bundle_files.TOKENIZER_SUBDIR), exist_ok=True)
    dtype = model_json["dtype"]
    for component, filename in COMPONENT_FILES.items():
        name = dtype if isinstance(dtype, str) else dtype.get(component, "float32")
        bundle_files.save_component(modules[component].to(DTYPES[name]).eval(), out_dir, filename)
    bundle_files.copy_tokenizer(tokenizer_dir, out_dir, TOKENIZER_FILES, OPTIONAL_TOKENIZER_FILES)
    bundle_files.write_manifest(out_dir, model_json)
