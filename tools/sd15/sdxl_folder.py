"""A diffusers-format Stable Diffusion XL pipeline folder, and building its models from it.

Layout (what `huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0` gives):

  model_index.json            StableDiffusionXLPipeline: component name -> [library, class];
                              force_zeros_for_empty_prompt (diffusers' default: true)
  unet/config.json            + diffusion_pytorch_model.safetensors or .bin (SDXL UNet)
  vae/config.json             + diffusion_pytorch_model.safetensors or .bin (full AutoencoderKL;
                              SDXL's scaling_factor 0.13025, force_upcast)
  text_encoder/config.json    + model.safetensors or pytorch_model.bin (CLIPTextModel)
  text_encoder_2/config.json  + model.safetensors or pytorch_model.bin
                              (CLIPTextModelWithProjection)
  tokenizer/, tokenizer_2/    vocab.json, merges.txt, tokenizer_config.json (optional),
                              special_tokens_map.json (optional); tokenizer_2 pads with "!"
  scheduler/scheduler_config.json

SDXLFolder.open checks all of it before any weights are read and lists every missing part. As
for SD1.5 (diffusers_folder.py), the UNet's weights can come from a separate state-dict file (a
DMD2 SDXL generator checkpoint; unet/ then needs only its config.json), loading is strict, the
text encoders' legacy `position_ids` buffer is dropped and the VAE keeps its decode path.
Nothing here exports bundles yet.
"""

import os
from typing import Any, Dict, List, Optional

from tools import clip_tokenizer_reference
from tools.sd15 import checkpoint_io
from tools.sd15.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from tools.sd15.config import ConfigError, resolve_text, resolve_unet, resolve_vae
from tools.sd15.diffusers_folder import (COMPONENTS as SD15_COMPONENTS, TEXT_POSITION_IDS,
                                         TOKENIZER_FILES, FolderError, _build, _read_json,
                                         find_component, read_index, read_scheduler_config,
                                         read_tokenizer_settings, vae_decoder_state_dict)
from tools.sd15.unet import UNet2DConditionModel
from tools.sd15.vae import VAEDecoder

PIPELINE_CLASS = "StableDiffusionXLPipeline"
COMPONENTS = {
    **SD15_COMPONENTS,
    "text_encoder_2": (["transformers", "CLIPTextModelWithProjection"],
                       ["model.safetensors", "pytorch_model.bin"]),
}
TOKENIZERS = ("tokenizer", "tokenizer_2")
# The time ids SDXL's UNet embeds: original size, crop top-left, target size (2 values each).
NUM_TIME_IDS = 6


def is_sdxl_index(index: Any) -> bool:
    """Whether a parsed model_index.json describes an SDXL-style pipeline (two text encoders)."""
    return isinstance(index, dict) and ("text_encoder_2" in index or
                                        index.get("_class_name") == PIPELINE_CLASS)


def is_sdxl_folder(path: str) -> bool:
    """Whether path/model_index.json exists and names an SDXL-style pipeline."""
    index_path = os.path.join(path, "model_index.json")
    return os.path.isfile(index_path) and is_sdxl_index(_read_json(index_path))


class SDXLFolder:
    """A validated SDXL diffusers folder: configs parsed, weight files located, nothing loaded.
    Build it with SDXLFolder.open(path). Not thread-safe to share while loading (plain data)."""

    def __init__(self, path: str, index: dict, configs: Dict[str, dict],
                 weights: Dict[str, str]):
        self.path = path
        try:
            self.unet_config = resolve_unet(configs["unet"], "sdxl")
            self.vae_config = resolve_vae(configs["vae"])
            self.text_config = resolve_text(configs["text_encoder"])
            self.text_2_config = resolve_text(configs["text_encoder_2"])
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        self.scheduler_config = configs["scheduler"]
        self.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", True))
        # diffusers' AutoencoderKL default; SDXL's VAE sets it (it overflows in float16).
        self.vae_force_upcast = bool(configs["vae"].get("force_upcast", True))
        self.weights = weights
        self.tokenizer_dirs = {name: os.path.join(path, name) for name in TOKENIZERS}

    @staticmethod
    def open(path: str, unet_weights: Optional[str] = None) -> "SDXLFolder":
        """unet_weights: a UNet state-dict file (e.g. DMD2's SDXL generator .bin) used instead of
        unet/'s weights, which then need not exist (only unet/config.json)."""
        index = read_index(path)
        problems: List[str] = []
        if index.get("_class_name") != PIPELINE_CLASS:
            problems.append(f"model_index.json: _class_name is {index.get('_class_name')!r}, "
                            f"expected {PIPELINE_CLASS!r}")
        configs: Dict[str, dict] = {}
        weights: Dict[str, str] = {}
        for name, (entry, files) in COMPONENTS.items():
            find_component(path, index, name, entry, files,
                           unet_weights if name == "unet" else None, configs, weights, problems)
        for tokenizer in TOKENIZERS:
            if index.get(tokenizer) != ["transformers", "CLIPTokenizer"]:
                problems.append(f"model_index.json: {tokenizer} is {index.get(tokenizer)!r}, "
                                "expected ['transformers', 'CLIPTokenizer']")
            for f in TOKENIZER_FILES:
                if not os.path.isfile(os.path.join(path, tokenizer, f)):
                    problems.append(f"missing {tokenizer}/{f}")
        read_scheduler_config(path, configs, problems)
        if problems:
            raise FolderError(f"{path}: not a usable SDXL diffusers folder: "
                              + "; ".join(problems))
        folder = SDXLFolder(path, index, configs, weights)
        folder._check_consistency()
        return folder

    def _check_consistency(self) -> None:
        u, v = self.unet_config, self.vae_config
        t, t2 = self.text_config, self.text_2_config
        width = t["hidden_size"] + t2["hidden_size"]
        if u["cross_attention_dim"] != width:
            raise FolderError(f"{self.path}: unet cross_attention_dim {u['cross_attention_dim']} "
                              f"!= text_encoder + text_encoder_2 hidden_size {width}")
        added = NUM_TIME_IDS * u["addition_time_embed_dim"] + t2["projection_dim"]
        if u["projection_class_embeddings_input_dim"] != added:
            raise FolderError(
                f"{self.path}: unet projection_class_embeddings_input_dim "
                f"{u['projection_class_embeddings_input_dim']} != {NUM_TIME_IDS} time ids x "
                f"{u['addition_time_embed_dim']} + text_encoder_2 projection_dim "
                f"{t2['projection_dim']}")
        if not u["in_channels"] == u["out_channels"] == v["latent_channels"]:
            raise FolderError(f"{self.path}: unet in/out channels {u['in_channels']}/"
                              f"{u['out_channels']} != vae latent_channels {v['latent_channels']}")

    def tokenizer_settings(self, name: str = "tokenizer") -> Dict[str, Any]:
        """max_length and the bos/eos/pad token strings of `tokenizer` or `tokenizer_2` (see
        diffusers_folder.read_tokenizer_settings)."""
        config = self.text_config if name == "tokenizer" else self.text_2_config
        return read_tokenizer_settings(self.tokenizer_dirs[name], config["max_position_embeddings"])

    def reference_tokenizer(self, name: str = "tokenizer") -> clip_tokenizer_reference.Tokenizer:
        """The Python reference tokenizer of `tokenizer` or `tokenizer_2`, with the folder's pad
        token (tokenizer_2's "!" also splits prompts, as transformers' CLIPTokenizer does)."""
        return clip_tokenizer_reference.Tokenizer(self.tokenizer_dirs[name],
                                                  self.tokenizer_settings(name)["pad_token"])

    def load_text_encoder(self) -> CLIPTextModel:
        return self._load_text("text_encoder", CLIPTextModel, self.text_config)

    def load_text_encoder_2(self) -> CLIPTextModelWithProjection:
        return self._load_text("text_encoder_2", CLIPTextModelWithProjection, self.text_2_config)

    def _load_text(self, name: str, cls, resolved: Dict[str, Any]):
        sd = checkpoint_io.read_state_dict(self.weights[name])
        sd.pop(TEXT_POSITION_IDS, None)
        return _build(cls, resolved, sd, self.weights[name])

    def load_vae_decoder(self) -> VAEDecoder:
        sd = vae_decoder_state_dict(checkpoint_io.read_state_dict(self.weights["vae"]))
        return _build(VAEDecoder, self.vae_config, sd, self.weights["vae"])

    def load_unet(self) -> UNet2DConditionModel:
        path = self.weights["unet"]
        return _build(UNet2DConditionModel, self.unet_config,
                      checkpoint_io.read_state_dict(path), path)
