"""Tests for tools/make_random_bundle.py with the tiny configs (the full-size SD1.5 bundle takes
4 GB and minutes per image on a CPU: docs/SD15.md records a manual run; the full-size SDXL one
about 14 GB)."""

import json
import os
import tempfile
import unittest

import torch

from tools import make_random_bundle
from tools.tests import util

FILES = {"text_encoder.pt": "text_encoder", "unet.pt": "unet", "vae_decoder.pt": "vae_decoder"}


def setUpModule():
    torch.set_num_threads(1)


def make(out: str, *extra: str) -> str:
    code, err = util.run_quietly(make_random_bundle.main, [
        "--arch", "sd15", "--config-dir", util.TINY_FOLDER, "--out", out, "--size", "64",
        "--batch-sizes", "1", *extra])
    if code != 0:
        raise AssertionError(err)
    return out


def weights(bundle: str) -> dict:
    return {f"{name}:{k}": v for name in FILES
            for k, v in torch.jit.load(os.path.join(bundle, name)).state_dict().items()}


class MakeRandomBundleTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.bundle = make(os.path.join(cls.tmp.name, "a"))

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_manifest_is_the_one_step_dmd2_recipe(self):
        with open(os.path.join(self.bundle, "model.json"), encoding="utf-8") as f:
            m = json.load(f)
        self.assertEqual(m["name"], "sd15-random")
        self.assertEqual(m["schedule"]["timesteps"], [999])
        self.assertEqual(m["schedule"]["alphas_cumprod"], [util.SD15_ALPHA_999])
        self.assertEqual(m["latent_scaling_factor"], util.SD15_SCALING)
        self.assertEqual(m["image"], {"width": 64, "height": 64, "channels": 3,
                                      "supported_sizes": [[64, 64]]})
        self.assertEqual(m["batch_sizes"], [1])

    def test_architecture_has_the_reference_keys_and_shapes(self):
        for name, component in FILES.items():
            with self.subTest(component):
                sd = torch.jit.load(os.path.join(self.bundle, name)).state_dict()
                self.assertEqual([(k, tuple(v.shape)) for k, v in sd.items()],
                                 util.key_list(os.path.join(component, "keys.txt")))

    def test_weights_are_seeded(self):
        same = weights(make(os.path.join(self.tmp.name, "same")))
        other = weights(make(os.path.join(self.tmp.name, "other"), "--seed", "1"))
        mine = weights(self.bundle)
        self.assertTrue(all(torch.equal(v, same[k]) for k, v in mine.items()))
        self.assertFalse(torch.equal(mine["unet.pt:conv_in.weight"],
                                     other["unet.pt:conv_in.weight"]))

    def test_bundle_makes_images(self):
        items = [{"input_ids": util.tokenizer_vectors()[0]["input_ids_77"], "seed": 1}]
        image = util.reference_pipeline().run(self.bundle, items, 64, 64, [])
        self.assertEqual(tuple(image.shape), (1, 64, 64, 3))
        self.assertGreater(image.float().std().item(), 5)

    def test_missing_config_dir_is_an_error(self):
        missing = os.path.join(self.tmp.name, "nope")
        code, err = util.run_quietly(make_random_bundle.main, [
            "--config-dir", missing, "--out", os.path.join(self.tmp.name, "x")])
        self.assertEqual(code, 1)
        self.assertIn("unet/config.json: cannot read config", err)


class MakeRandomSDXLBundleTest(unittest.TestCase):
    """--arch sdxl with the tiny SDXL folder's configs (tools/tests/testdata/sdxl-parity)."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.bundle = make_sdxl(os.path.join(cls.tmp.name, "a"), "--dtype", "bfloat16")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_manifest_is_v2_with_the_one_step_dmd2_recipe(self):
        with open(os.path.join(self.bundle, "model.json"), encoding="utf-8") as f:
            m = json.load(f)
        self.assertEqual(m["format"], "dmdserve.bundle/v2")
        self.assertEqual(m["name"], "sdxl-random")
        self.assertEqual(m["schedule"], {"timesteps": [399],
                                         "alphas_cumprod": [0.4260861575603485],
                                         "step_mode": "ddim"})
        self.assertEqual(m["tokenizer_2"]["pad_token"], "!")
        self.assertEqual(m["tokenizer_2"]["vocab"], "tokenizer/vocab.json")
        self.assertEqual((m["conditioning"], m["unconditional"]), ("text_time", "zeros"))
        self.assertEqual(m["latent_scaling_factor"], 0.13025)
        self.assertEqual(m["dtype"], {"text_encoder": "bfloat16", "generator": "bfloat16",
                                      "decoder": "float32"})
        self.assertEqual(m["components"]["text_encoder"], "text_encoders.pt")

    def test_architecture_has_the_reference_keys_and_shapes(self):
        text = torch.jit.load(os.path.join(self.bundle, "text_encoders.pt")).state_dict()
        for prefix, component in (("text_encoder.", "text_encoder"),
                                  ("text_encoder_2.", "text_encoder_2")):
            with self.subTest(component):
                got = [(k[len(prefix):], tuple(v.shape)) for k, v in text.items()
                       if k.startswith(prefix)]
                self.assertEqual(got, util.key_list(os.path.join(component, "keys.txt"),
                                                    util.SDXL_PARITY))
        unet = torch.jit.load(os.path.join(self.bundle, "unet.pt")).state_dict()
        self.assertEqual([(k, tuple(v.shape)) for k, v in unet.items()],
                         util.key_list(os.path.join("unet", "keys.txt"), util.SDXL_PARITY))

    def test_bundle_makes_images_with_the_reference_pipeline(self):
        vector = util.tokenizer_vectors()[0]
        items = [{"input_ids": vector["input_ids_77"], "seed": 1,
                  "input_ids_2": [0 if i >= vector["input_ids_77"].index(49407) + 1 else x
                                  for i, x in enumerate(vector["input_ids_77"])]}]
        image = util.reference_pipeline().run(self.bundle, items, 128, 128, [])
        self.assertEqual(tuple(image.shape), (1, 128, 128, 3))
        self.assertGreater(image.float().std().item(), 5)

    def test_other_recipes(self):
        out = make_sdxl(os.path.join(self.tmp.name, "turbo"), "--recipe", "sdxl-turbo")
        with open(os.path.join(out, "model.json"), encoding="utf-8") as f:
            schedule = json.load(f)["schedule"]
        self.assertEqual(schedule["timesteps"], [999])
        self.assertAlmostEqual(schedule["initial_noise_scale"], 0.99766723, places=7)
        for extra, message in [(["--recipe", "ddim"], "--recipe must be one of dmd2-sdxl-1step"),
                               (["--recipe", "sdxl-lightning"], "needs --steps 2, 4 or 8")]:
            with self.subTest(extra):
                code, err = util.run_quietly(make_random_bundle.main, [
                    "--arch", "sdxl", "--config-dir", util.TINY_SDXL,
                    "--out", os.path.join(self.tmp.name, "x"), *extra])
                self.assertEqual(code, 1)
                self.assertIn(message, err)
        code, err = util.run_quietly(make_random_bundle.main, [
            "--config-dir", util.TINY_FOLDER, "--out", os.path.join(self.tmp.name, "y"),
            "--recipe", "dmd2-sdxl-1step"])
        self.assertEqual(code, 1)
        self.assertIn("--arch sd15 has the dmd2-sd15-1step recipe only", err)


def make_sdxl(out: str, *extra: str) -> str:
    code, err = util.run_quietly(make_random_bundle.main, [
        "--arch", "sdxl", "--config-dir", util.TINY_SDXL, "--out", out, "--batch-sizes", "1",
        *extra])
    if code != 0:
        raise AssertionError(err)
    return out


if __name__ == "__main__":
    unittest.main()
