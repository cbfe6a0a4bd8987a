"""A diffusers-format Stable Diffusion 1.5 pipeline folder, and building its models from it.

Layout (what `huggingface-cli download` of an SD1.5 repository gives):

  model_index.json          StableDiffusionPipeline: component name -> [library, class]
  unet/config.json          + diffusion_pytorch_model.safetensors or .bin
  vae/config.json           + diffusion_pytorch_model.safetensors or .bin (full AutoencoderKL)
  text_encoder/config.json  + model.safetensors or pytorch_model.bin
  tokenizer/vocab.json, merges.txt, tokenizer_config.json (optional), special_tokens_map.json
  scheduler/scheduler_config.json

DiffusersFolder.open checks all of it before any weights are read and lists every missing part.
The UNet's weights can come from a separate state-dict file instead (a DMD2 generator
checkpoint); unet/ then needs only its config.json. Loaded checkpoints are adapted the way
diffusers/transformers adapt them: the text encoder's legacy `position_ids` buffer is dropped;
the VAE's encoder.* and quant_conv.* are dropped (not on the decode path), and the deprecated
attention names query/key/value/proj_attn of older VAE checkpoints become to_q/to_k/to_v/to_out.0.
"""

import json
import os
from typing import Any, Dict, List, Optional

from torch import nn

from tools.sd15 import checkpoint_io
from tools.sd15.blocks import meta_device
from tools.sd15.clip_text import CLIPTextModel
from tools.sd15.config import ConfigError, resolve_text, resolve_unet, resolve_vae
from tools.sd15.unet import UNet2DConditionModel
from tools.sd15.vae import VAEDecoder

# component folder -> (expected model_index entry, weight file names in order of preference)
COMPONENTS = {
    "unet": (["diffusers", "UNet2DConditionModel"],
             ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]),
    "vae": (["diffusers", "AutoencoderKL"],
            ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]),
    "text_encoder": (["transformers", "CLIPTextModel"], ["model.safetensors", "pytorch_model.bin"]),
}
TOKENIZER_FILES = ["vocab.json", "merges.txt"]
DEFAULT_SPECIAL_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                          "pad_token": "<|endoftext|>"}
TEXT_POSITION_IDS = "text_model.embeddings.position_ids"
VAE_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v",
                            "proj_attn": "to_out.0"}


class FolderError(ValueError):
    """A folder that is not a usable SD1.5 diffusers checkpoint; the message lists why."""


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise FolderError(f"{path}: cannot read JSON: {e}") from e


def _token_string(value: Any) -> Optional[str]:
    """A special token as written by transformers: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class DiffusersFolder:
    """A validated SD1.5 diffusers folder: configs parsed, weight files located, nothing loaded.
    Build it with DiffusersFolder.open(path)."""

    def __init__(self, path: str, configs: Dict[str, dict], weights: Dict[str, str]):
        self.path = path
        try:
            self.unet_config = resolve_unet(configs["unet"])
            self.vae_config = resolve_vae(configs["vae"])
            self.text_config = resolve_text(configs["text_encoder"])
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        self.scheduler_config = configs["scheduler"]
        self.weights = weights
        self.tokenizer_dir = os.path.join(path, "tokenizer")

    @staticmethod
    def open(path: str, unet_weights: Optional[str] = None) -> "DiffusersFolder":
        """unet_weights: a UNet state-dict file (e.g. DMD2's pytorch_model.bin) used instead of
        unet/'s weights, which then need not exist (only unet/config.json)."""
        index = read_index(path)
        index_path = os.path.join(path, "model_index.json")
        problems: List[str] = []
        if "text_encoder_2" in index or ("unet" not in index and "transformer" in index):
            raise FolderError(f"{index_path}: {index.get('_class_name')} is not an SD1.5-style "
                              "pipeline (SDXL and transformer-based pipelines are not supported)")
        configs: Dict[str, dict] = {}
        weights: Dict[str, str] = {}
        for name, (entry, files) in COMPONENTS.items():
            find_component(path, index, name, entry, files,
                           unet_weights if name == "unet" else None, configs, weights, problems)
        for f in TOKENIZER_FILES:
            if not os.path.isfile(os.path.join(path, "tokenizer", f)):
                problems.append(f"missing tokenizer/{f}")
        read_scheduler_config(path, configs, problems)
        if problems:
            raise FolderError(f"{path}: not a usable SD1.5 diffusers folder: "
                              + "; ".join(problems))
        folder = DiffusersFolder(path, configs, weights)
        folder._check_consistency()
        return folder

    def _check_consistency(self) -> None:
        u, v, t = self.unet_config, self.vae_config, self.text_config
        if u["cross_attention_dim"] != t["hidden_size"]:
            raise FolderError(f"{self.path}: unet cross_attention_dim {u['cross_attention_dim']} "
                              f"!= text_encoder hidden_size {t['hidden_size']}")
        if not u["in_channels"] == u["out_channels"] == v["latent_channels"]:
            raise FolderError(f"{self.path}: unet in/out channels {u['in_channels']}/"
                              f"{u['out_channels']} != vae latent_channels {v['latent_channels']}")

    def tokenizer_settings(self) -> Dict[str, Any]:
        """max_length and the bos/eos/pad token strings (see read_tokenizer_settings)."""
        return read_tokenizer_settings(self.tokenizer_dir,
                                       self.text_config["max_position_embeddings"])

    def load_text_encoder(self) -> CLIPTextModel:
        sd = checkpoint_io.read_state_dict(self.weights["text_encoder"])
        sd.pop(TEXT_POSITION_IDS, None)
        return _build(CLIPTextModel, self.text_config, sd, self.weights["text_encoder"])

    def load_vae_decoder(self) -> VAEDecoder:
        sd = vae_decoder_state_dict(checkpoint_io.read_state_dict(self.weights["vae"]))
        return _build(VAEDecoder, self.vae_config, sd, self.weights["vae"])

    def load_unet(self) -> UNet2DConditionModel:
        path = self.weights["unet"]
        return _build(UNet2DConditionModel, self.unet_config, checkpoint_io.read_state_dict(path),
                      path)


def read_index(path: str) -> dict:
    """model_index.json of the pipeline folder `path`, which must be a JSON object."""
    if not os.path.isdir(path):
        raise FolderError(f"{path}: not a directory")
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise FolderError(f"{path}: no model_index.json (not a diffusers pipeline folder)")
    index = _read_json(index_path)
    if not isinstance(index, dict):
        raise FolderError(f"{index_path}: must be a JSON object")
    return index


def find_component(path: str, index: dict, name: str, entry: list, files: List[str],
                   replacement: Optional[str], configs: Dict[str, dict],
                   weights: Dict[str, str], problems: List[str]) -> None:
    """Checks model_index.json's entry for component `name`, reads name/config.json into
    `configs` and locates its weights (the first of `files` present, or the `replacement` file)
    into `weights`; appends what is wrong to `problems`."""
    if index.get(name) != entry:
        problems.append(f"model_index.json: {name} is {index.get(name)!r}, expected {entry!r}")
    folder = os.path.join(path, name)
    config = os.path.join(folder, "config.json")
    if os.path.isfile(config):
        configs[name] = _read_json(config)
    else:
        problems.append(f"missing {name}/config.json")
    found = [f for f in files if os.path.isfile(os.path.join(folder, f))]
    if replacement:
        if not os.path.isfile(replacement):
            problems.append(f"UNet checkpoint {replacement}: no such file")
        weights[name] = replacement
    elif found:
        weights[name] = os.path.join(folder, found[0])
    elif os.path.isfile(os.path.join(folder, files[0] + ".index.json")):
        problems.append(f"{name}: sharded checkpoints are not supported")
    else:
        problems.append(f"missing {name} weights ({' or '.join(files)})")



def read_scheduler_config(path: str, configs: Dict[str, dict], problems: List[str]) -> None:
    """scheduler/scheduler_config.json into configs["scheduler"], or a problem."""
    scheduler = os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.isfile(scheduler):
        configs["scheduler"] = _read_json(scheduler)
    else:
        problems.append("missing scheduler/scheduler_config.json")


def read_tokenizer_settings(tokenizer_dir: str, max_position_embeddings: int) -> Dict[str, Any]:
    """max_length and the bos/eos/pad token strings of the tokenizer folder `tokenizer_dir`:
    tokenizer_config.json, then special_tokens_map.json, then CLIP's defaults; max_length is the
    text encoder's `max_position_embeddings`, lowered by a smaller `model_max_length`."""
    settings: Dict[str, Any] = dict(DEFAULT_SPECIAL_TOKENS)
    max_length = max_position_embeddings
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(tokenizer_dir, name)
        if not os.path.isfile(path):
            continue
        data = _read_json(path)
        for key in DEFAULT_SPECIAL_TOKENS:
            token = _token_string(data.get(key))
            if token is not None:
                settings[key] = token
        if isinstance(data.get("model_max_length"), int):
            max_length = min(max_length, data["model_max_length"])
    settings["max_length"] = max_length
    return settings


def vae_decoder_state_dict(sd: checkpoint_io.StateDict) -> checkpoint_io.StateDict:
    """A full AutoencoderKL state dict -> the decode path's (post_quant_conv.*, decoder.*),
    with deprecated attention names renamed and 1x1-conv attention weights made linear."""
    out = {}
    for key, value in sd.items():
        if key.startswith(("encoder.", "quant_conv.")):
            continue
        parts = key.split(".")
        if key.startswith("decoder.mid_block.attentions.") and len(parts) == 6:
            parts[4] = VAE_DEPRECATED_ATTENTION.get(parts[4], parts[4])
            if parts[-1] == "weight" and value.dim() == 4 and value.shape[2:] == (1, 1):
                value = value[:, :, 0, 0]
            key = ".".join(parts)
        out[key] = value
    return out


def _build(cls, resolved: Dict[str, Any], sd: checkpoint_io.StateDict, source: str) -> nn.Module:
    """cls(resolved) built on the meta device (no init cost), then filled strictly from sd."""
    with meta_device():
        model = cls(resolved)
    checkpoint_io.load_strict(model, sd, source)
    return model.eval()
