"""Writing SD1.5- and SDXL-architecture models as a dmdserve bundle (docs/BUNDLE.md).

The three modules are saved with torch.jit.script by the installed torch (1.13 here) and match
the bundle's TorchScript contracts. SD1.5 (dmdserve.bundle/v1), the modules as they are:
  text_encoder.pt   CLIPTextModel:        input_ids int64[B, L] -> float[B, L, D]
  unet.pt           UNet2DConditionModel: (sample, timestep int64[B], states) -> epsilon
  vae_decoder.pt    VAEDecoder:           latents / scaling_factor -> image in [-1, 1]
SDXL (dmdserve.bundle/v2 with tokenizer_2 and "conditioning": "text_time"):
  text_encoders.pt  SDXLTextEncoders:     (input_ids, input_ids_2 int64[B, L]) ->
                                          (states float[B, L, D1 + D2], text_embeds float[B, P])
  unet.pt           UNet2DConditionModel: (sample, timestep, states, text_embeds,
                                          time_ids float[B, 6]) -> epsilon
  vae_decoder.pt    VAEDecoder, as for SD1.5
Weights are stored in each component's dtype (the pipeline converts to the manifest's dtype at
load anyway; storing them converted halves a float16 bundle's size).
"""

import json
import os
import re
import filecmp
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from tools import bundle_files

FORMAT = "dmdserve.bundle/v1"
FORMAT_V2 = "dmdserve.bundle/v2"
COMPONENT_FILES = {"text_encoder": "text_encoder.pt", "generator": "unet.pt",
                   "decoder": "vae_decoder.pt"}
SDXL_COMPONENT_FILES = {**COMPONENT_FILES, "text_encoder": "text_encoders.pt"}
TOKENIZER_2_SUBDIR = "tokenizer_2"
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
             max_images_per_request: int, components: Optional[Dict[str, str]] = None,
             v2_fields: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """model.json for an SD-architecture bundle; sizes[0] is the default size. components: the
    TorchScript file names (default COMPONENT_FILES). v2_fields: the dmdserve.bundle/v2 fields
    (tokenizer_2, conditioning, unconditional), written after `tokenizer`; with them, or with a
    schedule that has initial_noise_scale, the format is v2, else v1."""
    check_name(name)
    check_batch_sizes(batch_sizes)
    check_image_sizes(sizes, downsample_factor)
    if not 1 <= max_images_per_request <= 1024:
        raise BundleError(f"max_images_per_request {max_images_per_request} must be 1-1024")
    dtype: Any = dtypes["generator"]
    if len(set(dtypes.values())) > 1:
        dtype = dict(dtypes)
    v2 = bool(v2_fields) or "initial_noise_scale" in schedule_fields.get("schedule", {})
    return {
        "format": FORMAT_V2 if v2 else FORMAT,
        "name": name,
        "description": description,
        "image": {"width": sizes[0][0], "height": sizes[0][1], "channels": image_channels,
                  "supported_sizes": [[w, h] for w, h in sizes]},
        "latent": {"channels": latent_channels, "downsample_factor": downsample_factor},
        "tokenizer": {"vocab": "tokenizer/vocab.json", "merges": "tokenizer/merges.txt",
                      **tokenizer},
        **(v2_fields or {}),
        "components": dict(components or COMPONENT_FILES),
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


def tokenizer_2_block(tokenizer_dir: str, tokenizer_2_dir: str, settings: Dict[str, Any],
                      settings_2: Dict[str, Any]) -> Dict[str, Any]:
    """The manifest's tokenizer_2 block: vocab/merges point at tokenizer/'s copies when
    tokenizer_2's files are byte-identical to tokenizer's (SDXL's are), else at tokenizer_2/
    (write() then copies them there); then tokenizer_2's settings (its pad token)."""
    if settings_2["max_length"] != settings["max_length"]:
        raise BundleError(f"{tokenizer_2_dir}: max_length {settings_2['max_length']} differs "
                          f"from tokenizer's {settings['max_length']} (both tokenize the same "
                          "prompt for one text encoder call)")
    same = all(filecmp.cmp(os.path.join(tokenizer_dir, f), os.path.join(tokenizer_2_dir, f),
                           shallow=False) for f in TOKENIZER_FILES)
    subdir = bundle_files.TOKENIZER_SUBDIR if same else TOKENIZER_2_SUBDIR
    return {"vocab": f"{subdir}/vocab.json", "merges": f"{subdir}/merges.txt", **settings_2}


def check_output(out_dir: str, tokenizer_dir: str, overwrite: bool,
                 tokenizer_2_dir: Optional[str] = None) -> None:
    """Fails early (before minutes of model loading) on an output or tokenizer problem."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir)
                                    or os.listdir(out_dir) and not overwrite):
        raise BundleError(f"{out_dir}: exists and is not an empty directory (pass --overwrite "
                          "to write into a non-empty one)")
    for directory in [tokenizer_dir] + ([tokenizer_2_dir] if tokenizer_2_dir else []):
        for f in TOKENIZER_FILES:
            if not os.path.isfile(os.path.join(directory, f)):
                raise BundleError(f"{directory}: missing {f}")


def write(out_dir: str, modules: Dict[str, nn.Module], model_json: Dict[str, Any],
          tokenizer_dir: str, overwrite: bool = False,
          tokenizer_2_dir: Optional[str] = None) -> None:
    """Writes the bundle: TorchScript files (modules keyed by component name, converted to the
    manifest's dtypes, named by its components), tokenizer files (tokenizer_2_dir's too when the
    manifest's tokenizer_2 block points at tokenizer_2/) and model.json (written last)."""
    check_output(out_dir, tokenizer_dir, overwrite, tokenizer_2_dir)
    os.makedirs(os.path.join(out_dir, bundle_files.TOKENIZER_SUBDIR), exist_ok=True)
    dtype = model_json["dtype"]
    for component, filename in model_json["components"].items():
        name = dtype if isinstance(dtype, str) else dtype.get(component, "float32")
        bundle_files.save_component(modules[component].to(DTYPES[name]).eval(), out_dir, filename)
    bundle_files.copy_tokenizer(tokenizer_dir, out_dir, TOKENIZER_FILES, OPTIONAL_TOKENIZER_FILES)
    second = model_json.get("tokenizer_2", {}).get("vocab", "")
    if second.startswith(TOKENIZER_2_SUBDIR + "/"):
        if not tokenizer_2_dir:
            raise BundleError("the manifest's tokenizer_2 block needs tokenizer_2's files")
        bundle_files.copy_tokenizer(tokenizer_2_dir, out_dir, TOKENIZER_FILES,
                                    OPTIONAL_TOKENIZER_FILES, TOKENIZER_2_SUBDIR)
    bundle_files.write_manifest(out_dir, model_json)
