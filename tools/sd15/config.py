"""Config dicts of the reference implementations -> resolved, validated constructor arguments.

A diffusers config.json lists only some constructor arguments; the rest take the class defaults.
resolve_* fills them in exactly as the reference does and rejects configs that need a feature
these modules do not implement, so that a model is never built silently wrong. Keys starting with
"_" (`_class_name`, ...) are metadata.

The UNet is resolved for an architecture family: "sd15" (the default, what the SD1.5 bundle
exporter serves) rejects SDXL's features (use_linear_projection, transformer_layers_per_block,
the "text_time" added conditioning); "sdxl" accepts them as well as every SD1.5 config.
"""

from typing import Any, Callable, Dict, Iterable, Optional, Tuple

# UNet2DConditionModel: arguments these modules implement, with diffusers' defaults.
UNET_VARIABLE = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "attention_head_dim": 8,
    "dropout": 0.0,  # inference only: dropout is off
}

# UNet2DConditionModel: the SDXL features, with diffusers' defaults (which are SD1.5's values).
# Fixed to these defaults for the "sd15" family, variable for "sdxl".
UNET_SDXL_FEATURES = {
    "transformer_layers_per_block": 1,
    "use_linear_projection": False,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
}

UNET_FAMILIES = ("sd15", "sdxl")

# UNet2DConditionModel: arguments that must keep their default (the SD1.5 architecture).
# upcast_attention: SDXL's config.json writes null, which diffusers treats as False.
UNET_FIXED = {
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

# AutoencoderKL.
VAE_VARIABLE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],  # encoder only: not used by decode
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "force_upcast": True,  # advice to run the VAE in float32; see docs/SD15.md
    "use_quant_conv": True,  # encoder only
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
VAE_FIXED = {
    "act_fn": "silu",
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
}

# CLIPTextConfig: the fields that shape CLIPTextModel's forward pass, with transformers' defaults.
# A transformers config carries many more generic fields (architectures, torch_dtype, token ids,
# dropout rates, ...) that do not change inference; they are ignored.
TEXT_VARIABLE = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,  # CLIPTextModelWithProjection's text_projection only
}


class ConfigError(ValueError):
    """A config the SD1.5 modules cannot implement; the message names the key and value."""


def _resolve(what: str, cfg: Dict[str, Any], variable: Dict[str, Any], fixed: Dict[str, Any],
             strict_keys: bool, equal_to_fixed: Optional[Callable[[str, Any], bool]] = None
             ) -> Dict[str, Any]:
    if not isinstance(cfg, dict):
        raise ConfigError(f"{what}: config must be a JSON object, got {type(cfg).__name__}")
    out = {**variable, **fixed}
    for key, value in cfg.items():
        if key.startswith("_"):
            continue
        if key in fixed:
            if value != fixed[key] and not (equal_to_fixed and equal_to_fixed(key, value)):
                raise ConfigError(f"{what}: {key}={value!r} is not supported "
                                  f"(only {fixed[key]!r} is implemented)")
        elif key not in variable:
            if strict_keys:
                raise ConfigError(f"{what}: unknown config key {key!r}")
            continue
        out[key] = value
    return out


def _require(what: str, ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"{what}: {message}")


def _positive_ints(values: Iterable[Any]) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def _unet_fixed_alias(key: str, value: Any) -> bool:
    """Values diffusers treats like the fixed default (SDXL writes upcast_attention null)."""
    return key == "upcast_attention" and value is None


def resolve_unet(cfg: Dict[str, Any], family: str = "sd15") -> Dict[str, Any]:
    """UNet2DConditionModel config -> every argument (as diffusers resolves it), validated.

    family "sd15" accepts the SD1.5 architecture only; "sdxl" also SDXL's features (see the
    module comment). The result has the same keys for both.
    """
    what = "unet config"
    _require(what, family in UNET_FAMILIES, f"unknown architecture family {family!r}")
    if family == "sdxl":
        variable, fixed = {**UNET_VARIABLE, **UNET_SDXL_FEATURES}, UNET_FIXED
    else:
        variable, fixed = UNET_VARIABLE, {**UNET_FIXED, **UNET_SDXL_FEATURES}
    r = _resolve(what, cfg, variable, fixed, strict_keys=True, equal_to_fixed=_unet_fixed_alias)
    channels = r["block_out_channels"]
    n = len(channels)
    _require(what, isinstance(channels, list) and n > 0 and _positive_ints(channels),
             f"block_out_channels must be a non-empty list of positive ints, got {channels!r}")
    _require(what, len(r["down_block_types"]) == n and len(r["up_block_types"]) == n,
             "down_block_types, up_block_types and block_out_channels must have the same length")
    for t in r["down_block_types"]:
        _require(what, t in ("CrossAttnDownBlock2D", "DownBlock2D"),
                 f"down block type {t!r} is not supported")
    for t in r["up_block_types"]:
        _require(what, t in ("CrossAttnUpBlock2D", "UpBlock2D"),
                 f"up block type {t!r} is not supported")
    _require(what, isinstance(r["layers_per_block"], int) and r["layers_per_block"] > 0,
             f"layers_per_block must be a positive int, got {r['layers_per_block']!r}")
    _require(what, isinstance(r["cross_attention_dim"], int),
             f"cross_attention_dim must be an int, got {r['cross_attention_dim']!r}")
    heads = r["attention_head_dim"]
    heads = [heads] * n if isinstance(heads, int) else heads
    _require(what, isinstance(heads, list) and len(heads) == n and _positive_ints(heads),
             f"attention_head_dim must be an int or one int per block, got "
             f"{r['attention_head_dim']!r}")
    groups = r["norm_num_groups"]
    for c, h in zip(channels, heads):
        _require(what, c % groups == 0, f"{c} channels are not divisible by {groups} groups")
        _require(what, c % h == 0, f"{c} channels are not divisible by {h} attention heads")
    _require(what, channels[0] % 2 == 0,
             f"block_out_channels[0] (the timestep embedding size) must be even, got {channels[0]}")
    _check_sdxl_features(what, r)
    return r


def _check_sdxl_features(what: str, r: Dict[str, Any]) -> None:
    n = len(r["block_out_channels"])
    layers = r["transformer_layers_per_block"]
    layers = [layers] * n if isinstance(layers, int) else layers
    _require(what, isinstance(layers, list) and len(layers) == n and _positive_ints(layers),
             f"transformer_layers_per_block must be an int or one int per block, got "
             f"{r['transformer_layers_per_block']!r}")
    _require(what, isinstance(r["use_linear_projection"], bool),
             f"use_linear_projection must be a bool, got {r['use_linear_projection']!r}")
    kind = r["addition_embed_type"]
    _require(what, kind in (None, "text_time"),
             f"addition_embed_type {kind!r} is not supported (null or 'text_time')")
    if kind == "text_time":
        time_dim = r["addition_time_embed_dim"]
        in_dim = r["projection_class_embeddings_input_dim"]
        _require(what, _positive_ints([time_dim]) and time_dim % 2 == 0,
                 f"addition_time_embed_dim must be a positive even int, got {time_dim!r}")
        _require(what, _positive_ints([in_dim]) and in_dim > 6 * time_dim,
                 f"projection_class_embeddings_input_dim must exceed 6 * addition_time_embed_dim "
                 f"(the pooled text embedding comes first), got {in_dim!r}")


def unet_transformer_layers(r: Dict[str, Any]) -> list:
    """Transformer blocks per Transformer2DModel at each level (down path order); the up path
    uses the reversed list and the mid block the last entry, as diffusers does."""
    layers = r["transformer_layers_per_block"]
    return [layers] * len(r["block_out_channels"]) if isinstance(layers, int) else list(layers)


def unet_added_cond_dims(r: Dict[str, Any]) -> Tuple[int, int]:
    """("text_time" conditioning) (sinusoid size per time id, pooled text embedding size); (0, 0)
    without added conditioning."""
    if r["addition_embed_type"] != "text_time":
        return 0, 0
    time_dim = r["addition_time_embed_dim"]
    return time_dim, r["projection_class_embeddings_input_dim"] - 6 * time_dim


def unet_heads(r: Dict[str, Any]) -> list:
    """Attention heads per block: diffusers reads `attention_head_dim` as the number of heads."""
    heads = r["attention_head_dim"]
    return [heads] * len(r["block_out_channels"]) if isinstance(heads, int) else list(heads)


def resolve_vae(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """AutoencoderKL config -> every argument, validated for the decode path."""
    what = "vae config"
    r = _resolve(what, cfg, VAE_VARIABLE, VAE_FIXED, strict_keys=True)
    channels = r["block_out_channels"]
    _require(what, isinstance(channels, list) and len(channels) > 0 and _positive_ints(channels),
             f"block_out_channels must be a non-empty list of positive ints, got {channels!r}")
    _require(what, len(r["up_block_types"]) == len(channels),
             "up_block_types and block_out_channels must have the same length")
    for t in r["up_block_types"]:
        _require(what, t == "UpDecoderBlock2D", f"up block type {t!r} is not supported")
    for c in channels:
        _require(what, c % r["norm_num_groups"] == 0,
                 f"{c} channels are not divisible by {r['norm_num_groups']} groups")
    _require(what, isinstance(r["scaling_factor"], (int, float)) and r["scaling_factor"] > 0,
             f"scaling_factor must be a positive number, got {r['scaling_factor']!r}")
    return r


def vae_downsample_factor(r: Dict[str, Any]) -> int:
    """Pixels per latent cell: the decoder upsamples 2x in every block but the last."""
    return 2 ** (len(r["block_out_channels"]) - 1)


def resolve_text(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """CLIPTextConfig (or a CLIPTextModel config.json) -> the fields that shape the model."""
    what = "text_encoder config"
    r = _resolve(what, cfg, TEXT_VARIABLE, {}, strict_keys=False)
    _require(what, r["hidden_act"] in ("quick_gelu", "gelu"),
             f"hidden_act {r['hidden_act']!r} is not supported (quick_gelu or gelu)")
    _require(what, r["hidden_size"] % r["num_attention_heads"] == 0,
             "hidden_size must be divisible by num_attention_heads")
    return {k: r[k] for k in TEXT_VARIABLE}
