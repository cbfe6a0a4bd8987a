"""Numerical parity of tools/sd15's UNet, VAE decoder and CLIP text encoder with the reference
implementations (diffusers / transformers), on the fixtures of tools/tests/testdata/sd-parity."""

import json
import os
import unittest

import torch

from tools.sd15 import config as cfg
from tools.sd15 import sd15_configs
from tools.sd15.blocks import meta_device
from tools.sd15.checkpoint_io import key_shapes
from tools.sd15.clip_text import CLIPTextModel, pooled_output
from tools.sd15.unet import UNet2DConditionModel
from tools.sd15.vae import VAEDecoder
from tools.tests import util

# Float32 vs the float32 reference: the fixtures README measured <= 1e-5 of float noise across
# thread counts and kernels; 1e-4 is the tolerance the issue sets.
FLOAT32_ATOL = 1e-4
# Float64 vs the float64 reference: float64 rounding is ~1e-15 here, while every wiring error
# the README lists (a norm eps off by 10x included) moves the output by >= 3e-5.
FLOAT64_ATOL = 1e-9


def setUpModule():
    torch.set_num_threads(1)


def build(cls, component: str, dtype=torch.float32):
    model = cls.from_config(util.fixture_json(component, "config.json")).eval()
    model.load_state_dict(util.fixture(component, "weights.pt"), strict=True)
    return model.to(dtype)


def run(component: str, model, inputs: dict) -> dict:
    with torch.no_grad():
        if component == "text_encoder":
            hidden = model(inputs["input_ids"])
            return {"last_hidden_state": hidden,
                    "pooler_output": pooled_output(hidden, inputs["input_ids"])}
        if component == "unet":
            return {"sample": model(inputs["sample"], inputs["timestep"],
                                    inputs["encoder_hidden_states"])}
        return {"sample": model(inputs["latents"])}


CASES = [("text_encoder", CLIPTextModel), ("unet", UNet2DConditionModel),
         ("vae_decoder", VAEDecoder)]


class ParityTest(unittest.TestCase):
    def test_state_dict_keys_and_shapes_equal_the_reference_in_order(self):
        for component, cls in CASES:
            with self.subTest(component):
                model = cls.from_config(util.fixture_json(component, "config.json"))
                self.assertEqual(list(key_shapes(model).items()),
                                 util.key_list(os.path.join(component, "keys.txt")))

    def test_float32_outputs_match_the_reference(self):
        for component, cls in CASES:
            model = build(cls, component)
            outputs = run(component, model, util.fixture(component, "inputs.pt"))
            for name, expected in util.fixture(component, "outputs.pt").items():
                with self.subTest(component=component, output=name):
                    got = outputs[name]
                    self.assertEqual(got.shape, expected.shape)
                    diff = util.max_diff(got, expected)
                    print(f"[ parity ] {component}.{name} float32 max abs diff {diff:.3g}")
                    self.assertLessEqual(diff, FLOAT32_ATOL)

    def test_float64_outputs_match_the_float64_reference(self):
        for component, cls in CASES:
            model = build(cls, component, torch.float64)
            inputs = {k: v.double() if v.is_floating_point() else v
                      for k, v in util.fixture(component, "inputs.pt").items()}
            outputs = run(component, model, inputs)
            for name, expected in util.fixture(component, "outputs_float64.pt").items():
                with self.subTest(component=component, output=name):
                    diff = util.max_diff(outputs[name], expected)
                    print(f"[ parity ] {component}.{name} float64 max abs diff {diff:.3g}")
                    self.assertLessEqual(diff, FLOAT64_ATOL)

    def test_timestep_embedding_matches_the_reference_intermediate(self):
        model = build(UNet2DConditionModel, "unet")
        inputs = util.fixture("unet", "inputs.pt")
        inter = util.fixture("unet", "intermediates.pt")
        with torch.no_grad():
            t_emb = model.timestep_embedding(inputs["timestep"])
            self.assertLessEqual(util.max_diff(t_emb, inter["time_proj"]), FLOAT32_ATOL)
            self.assertLessEqual(util.max_diff(model.time_embedding(t_emb),
                                               inter["time_embedding"]), FLOAT32_ATOL)

    def test_torchscript_gives_the_eager_outputs(self):
        for component, cls in CASES:
            with self.subTest(component):
                model = build(cls, component)
                inputs = util.fixture(component, "inputs.pt")
                eager = run(component, model, inputs)
                scripted = run(component, torch.jit.script(model), inputs)
                for name in eager:
                    self.assertTrue(torch.equal(eager[name], scripted[name]), name)

    def test_unet_runs_latent_sizes_not_divisible_by_8(self):
        # 12 -> 6 -> 3 -> 2 on the way down; each upsampler targets its skip's size.
        model = build(UNet2DConditionModel, "unet")
        states = util.fixture("unet", "inputs.pt")["encoder_hidden_states"][:1]
        with torch.no_grad():
            out = model(torch.randn(1, 4, 12, 20), torch.tensor([999]), states)
        self.assertEqual(tuple(out.shape), (1, 4, 12, 20))
        self.assertTrue(torch.isfinite(out).all())


class FullSizeKeysTest(unittest.TestCase):
    """The full-size SD1.5 models, built on the meta device (no 4 GB allocation), have exactly
    the reference key lists and shapes of real SD1.5 / DMD2 checkpoints."""

    def test_full_size_key_lists_and_shapes(self):
        cases = [(UNet2DConditionModel, "unet", "unet_sd15_keys.txt", 859_520_964),
                 (VAEDecoder, "vae_decoder", "vae_sd15_decoder_keys.txt", 49_490_199),
                 (CLIPTextModel, "text_encoder", "text_encoder_sd15_keys.txt", 123_060_480)]
        for cls, component, keys_file, params in cases:
            with self.subTest(component):
                with meta_device():
                    model = cls.from_config(util.fixture_json(component, "config_sd15.json"))
                self.assertTrue(all(p.is_meta for p in model.parameters()))
                self.assertEqual(list(key_shapes(model).items()), util.key_list(keys_file))
                self.assertEqual(sum(p.numel() for p in model.parameters()), params)

    def test_builtin_sd15_configs_are_the_published_ones(self):
        self.assertEqual(sd15_configs.UNET, util.fixture_json("unet", "config_sd15.json"))
        self.assertEqual(sd15_configs.VAE, util.fixture_json("vae_decoder", "config_sd15.json"))
        self.assertEqual(sd15_configs.TEXT_ENCODER,
                         util.fixture_json("text_encoder", "config_sd15.json"))
        with open(os.path.join(util.TINY_FOLDER, "scheduler", "scheduler_config.json")) as f:
            scheduler = json.load(f)  # SD1.5's scheduler config (tiny folder README)
        for key, value in sd15_configs.SCHEDULER.items():
            self.assertEqual(scheduler[key], value, key)


class ConfigTest(unittest.TestCase):
    def test_resolution_fills_defaults_like_the_reference(self):
        for resolve, component in [(cfg.resolve_unet, "unet"), (cfg.resolve_vae, "vae_decoder")]:
            with self.subTest(component):
                self.assertEqual(resolve(util.fixture_json(component, "config.json")),
                                 util.fixture_json(component, "config_resolved.json"))
                self.assertEqual(resolve(util.fixture_json(component, "config_sd15.json")),
                                 util.fixture_json(component, "config_sd15_resolved.json"))
        resolved = util.fixture_json("text_encoder", "config_resolved.json")
        self.assertEqual(cfg.resolve_text(util.fixture_json("text_encoder", "config.json")),
                         {k: resolved[k] for k in cfg.TEXT_VARIABLE})

    def test_unsupported_architectures_are_rejected_by_name(self):
        base = util.fixture_json("unet", "config.json")
        cases = [({"use_linear_projection": True}, "use_linear_projection=True"),
                 ({"addition_embed_type": "text_time"}, "addition_embed_type"),
                 ({"some_new_option": 1}, "unknown config key 'some_new_option'"),
                 ({"down_block_types": ["CrossAttnDownBlock2D"] * 3}, "same length"),
                 ({"attention_head_dim": 3}, "not divisible by 3 attention heads"),
                 ({"up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                      "SimpleCrossAttnUpBlock2D"]}, "SimpleCrossAttnUpBlock2D")]
        for change, message in cases:
            with self.subTest(change):
                with self.assertRaisesRegex(cfg.ConfigError, message):
                    cfg.resolve_unet({**base, **change})
        with self.assertRaisesRegex(cfg.ConfigError, "shift_factor"):
            cfg.resolve_vae({**util.fixture_json("vae_decoder", "config.json"),
                             "shift_factor": 0.1159})
        with self.assertRaisesRegex(cfg.ConfigError, "hidden_act 'relu'"):
            cfg.resolve_text({**util.fixture_json("text_encoder", "config.json"),
                              "hidden_act": "relu"})


if __name__ == "__main__":
    unittest.main()
