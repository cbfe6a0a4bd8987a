"""Numerical parity of tools/sd15's SDXL architecture (the UNet with use_linear_projection,
transformer_layers_per_block and text_time conditioning; CLIPTextModel's penultimate state;
CLIPTextModelWithProjection) with diffusers / transformers, on the fixtures of
tools/tests/testdata/sdxl-parity. Also: every wiring error the fixtures' sensitivity table lists,
injected into the implementation, makes the parity check fail."""

import os
import types
import unittest
from unittest import mock

import torch
from torch import nn

from tools.sd15 import clip_text
from tools.sd15 import config as cfg
from tools.sd15 import sdxl_configs
from tools.sd15.blocks import ResnetBlock2D, meta_device
from tools.sd15.checkpoint_io import key_shapes
from tools.sd15.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from tools.sd15.unet import Attention, Transformer2DModel, UNet2DConditionModel
from tools.tests import util

# The fixtures README measured <= 2e-6 of float32 noise (threads, kernels, float64 vs float32);
# its smallest wiring error that is not a norm eps (the other GELU) moves an output by 3.8e-2.
FLOAT32_ATOL = 1e-4
# Float64 rounding is ~1e-15 here (the sinusoids are computed in float32 as diffusers does, so
# they match bit for bit); the smallest wiring error (a GroupNorm eps) moves the output by 1.7e-6.
FLOAT64_ATOL = 1e-9
TOLERANCE = {torch.float32: FLOAT32_ATOL, torch.float64: FLOAT64_ATOL}
TEXT = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
# The first tiny encoder's width: its share of the UNet's encoder_hidden_states (16 + 24).
TEXT_WIDTH = 16


def setUpModule():
    torch.set_num_threads(1)


def fixture(component: str, name: str) -> dict:
    return util.fixture(component, name, root=util.SDXL_PARITY)


def fixture_json(component: str, name: str) -> dict:
    return util.fixture_json(component, name, root=util.SDXL_PARITY)


def build(component: str, dtype=torch.float32) -> nn.Module:
    """The tiny model of `component`, weights loaded with strict key matching."""
    config = fixture_json(component, "config.json")
    if component == "unet":
        model = UNet2DConditionModel.from_config(config, "sdxl")
    else:
        model = TEXT[component].from_config(config)
    model.load_state_dict(fixture(component, "weights.pt"), strict=True)
    return model.eval().to(dtype)


def inputs_for(component: str, dtype=torch.float32) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v
            for k, v in fixture(component, "inputs.pt").items()}


def run(component: str, model: nn.Module, inputs: dict) -> dict:
    """Every output the fixture's outputs.pt holds."""
    with torch.no_grad():
        if component == "unet":
            return {"sample": model(inputs["sample"], inputs["timestep"],
                                    inputs["encoder_hidden_states"], inputs["text_embeds"],
                                    inputs["time_ids"])}
        ids = inputs["input_ids"]
        last = model.text_model(ids)
        out = {"last_hidden_state": last, "pooler_output": clip_text.pooled_output(last, ids)}
        if component == "text_encoder":
            out["penultimate_hidden_state"] = model.penultimate_hidden_state(ids)
        else:
            out["penultimate_hidden_state"], out["text_embeds"] = model(ids)
        return out


def errors(component: str, model: nn.Module, dtype=torch.float32, inputs=None) -> dict:
    """output name -> max abs difference from the reference run in `dtype`."""
    got = run(component, model, inputs if inputs is not None else inputs_for(component, dtype))
    name = "outputs.pt" if dtype == torch.float32 else "outputs_float64.pt"
    return {k: util.max_diff(got[k], v) for k, v in fixture(component, name).items()}


class SdxlParityTest(unittest.TestCase):
    def test_state_dict_keys_and_shapes_equal_the_reference_in_order(self):
        for component in ["unet", "text_encoder", "text_encoder_2"]:
            with self.subTest(component):
                model = build(component)
                self.assertEqual(list(key_shapes(model).items()),
                                 util.key_list(os.path.join(component, "keys.txt"),
                                               root=util.SDXL_PARITY))

    def test_outputs_match_the_reference_in_float32_and_float64(self):
        for dtype in [torch.float32, torch.float64]:
            for component in ["text_encoder", "text_encoder_2", "unet"]:
                diffs = errors(component, build(component, dtype), dtype)
                for name, diff in diffs.items():
                    with self.subTest(component=component, output=name, dtype=str(dtype)):
                        print(f"[ parity ] sdxl {component}.{name} {dtype} max abs diff "
                              f"{diff:.3g}")
                        self.assertLessEqual(diff, TOLERANCE[dtype])

    def test_unet_intermediates_match_the_reference(self):
        model = build("unet")
        inputs = inputs_for("unet")
        expected = fixture("unet", "intermediates.pt")
        got = {}
        modules = dict(model.named_modules())
        for name in expected:
            if name in modules:
                modules[name].register_forward_hook(
                    lambda m, i, o, name=name: got.__setitem__(
                        name, o[0] if isinstance(o, tuple) else o))
        run("unet", model, inputs)
        with torch.no_grad():
            got["time_proj"] = model.timestep_embedding(inputs["timestep"])
            got["time_embedding"] = model.time_embedding(got["time_proj"])
            got["add_time_proj"] = model.add_time_proj(inputs["time_ids"].flatten())
            got["add_embedding"] = model.add_embedding(
                model.added_embedding_input(inputs["text_embeds"], inputs["time_ids"]))
            got["emb"] = model.embedding(inputs["timestep"], inputs["text_embeds"],
                                         inputs["time_ids"], torch.float32)
        self.assertEqual(sorted(got), sorted(expected))
        for name, value in expected.items():
            with self.subTest(name):
                self.assertEqual(got[name].shape, value.shape)
                self.assertLessEqual(util.max_diff(got[name], value), FLOAT32_ATOL)

    def test_text_conditioning_is_the_unets_input(self):
        # The UNet fixture's encoder_hidden_states and text_embeds are the text fixtures'
        # penultimate states (concatenated) and text_embeds of prompts 0 and 1.
        ids = fixture("text_encoder", "inputs.pt")["input_ids"][:2]
        ids_2 = fixture("text_encoder_2", "inputs.pt")["input_ids"][:2]
        with torch.no_grad():
            states, pooled = clip_text.sdxl_text_conditioning(
                build("text_encoder"), build("text_encoder_2"), ids, ids_2)
        unet_inputs = inputs_for("unet")
        self.assertLessEqual(util.max_diff(states, unet_inputs["encoder_hidden_states"]),
                             FLOAT32_ATOL)
        self.assertLessEqual(util.max_diff(pooled, unet_inputs["text_embeds"]), FLOAT32_ATOL)

    def test_torchscript_gives_the_eager_outputs(self):
        for component in ["unet", "text_encoder", "text_encoder_2"]:
            with self.subTest(component):
                model = build(component)
                inputs = inputs_for(component)
                eager = run(component, model, inputs)
                scripted = run(component, torch.jit.script(model), inputs)
                for name in eager:
                    self.assertTrue(torch.equal(eager[name], scripted[name]), name)

    def test_unet_needs_the_added_conditioning(self):
        model = build("unet")
        inputs = inputs_for("unet")
        with self.assertRaisesRegex(ValueError, "text_embeds and time_ids"):
            model(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])


class FullSizeKeysTest(unittest.TestCase):
    """The full-size SDXL base 1.0 models, built on the meta device (nothing allocated), have
    exactly the reference key lists and shapes of real SDXL / DMD2 checkpoints."""

    def test_full_size_key_lists_and_shapes(self):
        cases = [("unet", sdxl_configs.UNET, "unet_sdxl_keys.txt", 1680, 2_567_463_684),
                 ("text_encoder", sdxl_configs.TEXT_ENCODER, "text_encoder_sdxl_keys.txt", 196,
                  123_060_480),
                 ("text_encoder_2", sdxl_configs.TEXT_ENCODER_2, "text_encoder_2_sdxl_keys.txt",
                  517, 694_659_840)]
        for component, config, keys_file, keys, params in cases:
            with self.subTest(component):
                with meta_device():
                    if component == "unet":
                        model = UNet2DConditionModel.from_config(config, "sdxl")
                    else:
                        model = TEXT[component].from_config(config)
                self.assertTrue(all(p.is_meta for p in model.parameters()))
                expected = util.key_list(keys_file, root=util.SDXL_PARITY)
                self.assertEqual(len(expected), keys)
                self.assertEqual(list(key_shapes(model).items()), expected)
                self.assertEqual(sum(p.numel() for p in model.parameters()), params)

    def test_builtin_sdxl_configs_are_the_published_ones(self):
        for component, config in [("unet", sdxl_configs.UNET),
                                  ("text_encoder", sdxl_configs.TEXT_ENCODER),
                                  ("text_encoder_2", sdxl_configs.TEXT_ENCODER_2)]:
            with self.subTest(component):
                published = fixture_json(component, "config_sdxl.json")
                self.assertEqual(config, {k: v for k, v in published.items()
                                          if not k.startswith("_")})


class SdxlConfigTest(unittest.TestCase):
    def test_resolution_fills_defaults_like_the_reference(self):
        self.assertEqual(cfg.resolve_unet(fixture_json("unet", "config.json"), "sdxl"),
                         fixture_json("unet", "config_resolved.json"))

    def test_sd15_family_rejects_sdxl_by_name_and_sdxl_family_accepts_sd15(self):
        with self.assertRaisesRegex(cfg.ConfigError, "addition_embed_type='text_time'"):
            cfg.resolve_unet(sdxl_configs.UNET)
        for change in [{"use_linear_projection": True}, {"transformer_layers_per_block": 2}]:
            with self.subTest(change):
                with self.assertRaisesRegex(cfg.ConfigError, list(change)[0]):
                    cfg.resolve_unet({**util.fixture_json("unet", "config.json"), **change})
        sd15 = util.fixture_json("unet", "config.json")
        self.assertEqual(cfg.resolve_unet(sd15, "sdxl"), cfg.resolve_unet(sd15))

    def test_invalid_sdxl_features_are_rejected_by_name(self):
        base = fixture_json("unet", "config.json")
        cases = [({"transformer_layers_per_block": [1, 2]}, "transformer_layers_per_block"),
                 ({"addition_embed_type": "text"}, "addition_embed_type 'text'"),
                 ({"addition_time_embed_dim": 7}, "addition_time_embed_dim"),
                 ({"projection_class_embeddings_input_dim": 60},
                  "projection_class_embeddings_input_dim"),
                 ({"upcast_attention": True}, "upcast_attention=True"),
                 ({"some_new_option": 1}, "unknown config key 'some_new_option'")]
        for change, message in cases:
            with self.subTest(change):
                with self.assertRaisesRegex(cfg.ConfigError, message):
                    cfg.resolve_unet({**base, **change}, "sdxl")
        with self.assertRaisesRegex(cfg.ConfigError, "unknown architecture family 'sd3'"):
            cfg.resolve_unet(base, "sd3")


# --- Wiring errors ---------------------------------------------------------------------------
# Each injects one error of the fixtures README's sensitivity table into a freshly built model.


def _modules(model: nn.Module, cls) -> list:
    return [m for m in model.modules() if isinstance(m, cls)]


def _set_eps(modules: list, eps: float) -> None:
    for m in modules:
        m.eps = eps


def transformer_groupnorm_eps(model):
    _set_eps([t.norm for t in _modules(model, Transformer2DModel)], 1e-5)


def resnet_groupnorm_eps(model):
    _set_eps([n for r in _modules(model, ResnetBlock2D) for n in (r.norm1, r.norm2)], 1e-6)


def layernorm_eps(model):
    _set_eps(_modules(model, nn.LayerNorm), 1e-6)


def _swap_rows(linear: nn.Linear, first: slice, second: slice) -> None:
    with torch.no_grad():
        for p in [linear.weight, linear.bias]:
            if p is not None:
                a = p[first].clone()
                p[first] = p[second]
                p[second] = a


def query_key_swapped(model):
    attn = model.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    with torch.no_grad():
        q = attn.to_q.weight.clone()
        attn.to_q.weight.copy_(attn.to_k.weight)
        attn.to_k.weight.copy_(q)


def geglu_halves_swapped(model):
    proj = model.down_blocks[1].attentions[0].transformer_blocks[0].ff.net[0].proj
    half = proj.out_features // 2
    _swap_rows(proj, slice(0, half), slice(half, 2 * half))


def head_dim_read_as_head_size(model):
    for attn in _modules(model, Attention):
        attn.heads = attn.to_q.out_features // attn.heads


def _forward_without_permute(self, x, context):
    b, c, height, width = x.shape
    h = self.proj_in(self.norm(x).reshape(b, height * width, c))
    for block in self.transformer_blocks:
        h = block(h, context)
    return self.proj_out(h).reshape(b, c, height, width) + x


def projection_without_permute(model):
    for t in _modules(model, Transformer2DModel):
        t.forward = types.MethodType(_forward_without_permute, t)


def timestep_sin_first(model):
    model.time_proj.flip_sin_to_cos = False


def time_ids_sin_first(model):
    model.add_time_proj.flip_sin_to_cos = False


def time_ids_freq_shift_1(model):
    model.add_time_proj.freq_shift = 1.0


def added_input_reversed(model):
    def reversed_input(text_embeds, time_ids):
        time_embeds = model.time_ids_embedding(time_ids).to(text_embeds.dtype)
        return torch.cat([time_embeds, text_embeds], dim=-1)
    model.added_embedding_input = reversed_input


def added_conditioning_left_out(model):
    model.add_embedding = None


def no_causal_mask(model):
    model.text_model.causal_mask = lambda x: torch.zeros(x.size(1), x.size(1), dtype=x.dtype)


def other_gelu(model):
    for layer in model.text_model.encoder.layers:
        layer.mlp.quick_gelu = not layer.mlp.quick_gelu


def pooled_before_final_layer_norm(model):
    model.text_model.final_layer_norm = nn.Identity()


# (README row, component, dtype of the check that must catch it, injection, outputs it moves)
WIRING_ERRORS = [
    ("Transformer2DModel GroupNorm eps 1e-5 instead of 1e-6", "unet", torch.float64,
     transformer_groupnorm_eps, ["sample"]),
    ("ResNet GroupNorm eps 1e-6 instead of 1e-5", "unet", torch.float64, resnet_groupnorm_eps,
     ["sample"]),
    ("LayerNorm eps 1e-6 (encoder 1)", "text_encoder", torch.float64, layernorm_eps,
     ["penultimate_hidden_state", "last_hidden_state"]),
    ("LayerNorm eps 1e-6 (encoder 2)", "text_encoder_2", torch.float64, layernorm_eps,
     ["penultimate_hidden_state", "text_embeds"]),
    ("q/k swapped in one self-attention", "unet", torch.float32, query_key_swapped, ["sample"]),
    ("GEGLU halves swapped (one block)", "unet", torch.float32, geglu_halves_swapped,
     ["sample"]),
    ("attention_head_dim read as head size", "unet", torch.float32, head_dim_read_as_head_size,
     ["sample"]),
    ("linear proj_in/proj_out without the NCHW->NHWC permute", "unet", torch.float32,
     projection_without_permute, ["sample"]),
    ("timestep sinusoid flip_sin_to_cos=false", "unet", torch.float32, timestep_sin_first,
     ["sample"]),
    ("time_ids sinusoid flip_sin_to_cos=false", "unet", torch.float32, time_ids_sin_first,
     ["sample"]),
    ("time_ids sinusoid freq_shift 1", "unet", torch.float32, time_ids_freq_shift_1, ["sample"]),
    ("add_embedding input as [time embeds, text_embeds]", "unet", torch.float32,
     added_input_reversed, ["sample"]),
    ("added conditioning left out", "unet", torch.float32, added_conditioning_left_out,
     ["sample"]),
    ("no causal mask (encoder 1)", "text_encoder", torch.float32, no_causal_mask,
     ["penultimate_hidden_state"]),
    ("no causal mask (encoder 2)", "text_encoder_2", torch.float32, no_causal_mask,
     ["penultimate_hidden_state", "text_embeds"]),
    ("exact GELU in encoder 1", "text_encoder", torch.float32, other_gelu,
     ["penultimate_hidden_state"]),
    ("quick_gelu in encoder 2", "text_encoder_2", torch.float32, other_gelu,
     ["penultimate_hidden_state"]),
    ("pooled before final_layer_norm", "text_encoder_2", torch.float32,
     pooled_before_final_layer_norm, ["text_embeds"]),
]


class WiringErrorTest(unittest.TestCase):
    """The parity checks above are sensitive enough: each wiring error fails them."""

    def assert_caught(self, label: str, component: str, dtype, outputs: list, diffs: dict):
        for name in outputs:
            print(f"[ wiring ] {label}: {component}.{name} {dtype} max abs diff "
                  f"{diffs[name]:.3g} (tolerance {TOLERANCE[dtype]:g})")
            self.assertGreater(diffs[name], TOLERANCE[dtype], f"{label} not caught on {name}")

    def test_each_wiring_error_fails_the_parity_check(self):
        for label, component, dtype, inject, outputs in WIRING_ERRORS:
            with self.subTest(label):
                model = build(component, dtype)
                inject(model)
                self.assert_caught(label, component, dtype, outputs,
                                   errors(component, model, dtype))

    def test_pooled_row_at_the_last_position_fails_the_parity_check(self):
        with mock.patch.object(clip_text, "pooled_output", lambda last, ids: last[:, 76]):
            for component, outputs in [("text_encoder", ["pooler_output"]),
                                       ("text_encoder_2", ["pooler_output", "text_embeds"])]:
                with self.subTest(component):
                    diffs = errors(component, build(component))
                    self.assert_caught("pooled row at position 76", component, torch.float32,
                                       outputs, diffs)

    def test_each_input_error_fails_the_parity_check(self):
        inputs = inputs_for("unet")
        text_outputs = fixture("text_encoder", "outputs.pt")
        text_2_outputs = fixture("text_encoder_2", "outputs.pt")
        hw_swapped = inputs["time_ids"][:, [1, 0, 2, 3, 5, 4]]
        crop_swapped = inputs["time_ids"][:, [0, 1, 3, 2, 4, 5]]
        states = inputs["encoder_hidden_states"]
        encoders_swapped = torch.cat([states[..., TEXT_WIDTH:], states[..., :TEXT_WIDTH]], -1)
        last_states = torch.cat([text_outputs["last_hidden_state"][:2],
                                 text_2_outputs["last_hidden_state"][:2]], -1)
        cases = [("time_ids H/W swapped", {"time_ids": hw_swapped}),
                 ("time_ids crop (top, left) swapped", {"time_ids": crop_swapped}),
                 ("encoder_hidden_states as [encoder_2, encoder_1]",
                  {"encoder_hidden_states": encoders_swapped}),
                 ("last_hidden_state instead of hidden_states[-2]",
                  {"encoder_hidden_states": last_states})]
        model = build("unet")
        for label, change in cases:
            with self.subTest(label):
                diffs = errors("unet", model, inputs={**inputs, **change})
                self.assert_caught(label, "unet", torch.float32, ["sample"], diffs)

    def test_tokenizer_2_padding_moves_the_states_but_not_text_embeds(self):
        ids = fixture("text_encoder_2", "inputs.pt")["input_ids"]
        after_eos = torch.arange(ids.size(1))[None, :] > ids.argmax(dim=-1)[:, None]
        eos_padded = torch.where(after_eos, torch.full_like(ids, 49407), ids)
        self.assertFalse(torch.equal(eos_padded, ids))
        diffs = errors("text_encoder_2", build("text_encoder_2"),
                       inputs={"input_ids": eos_padded})
        self.assert_caught("tokenizer_2 ids padded with EOS", "text_encoder_2", torch.float32,
                           ["penultimate_hidden_state"], diffs)
        self.assertLessEqual(diffs["text_embeds"], FLOAT32_ATOL)


if __name__ == "__main__":
    unittest.main()
