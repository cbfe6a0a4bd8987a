"""Tests for tools/make_random_bundle.py with the tiny configs (the full-size SD1.5 bundle takes
4 GB and minutes per image on a CPU: docs/SD15.md records a manual run)."""

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


if __name__ == "__main__":
    unittest.main()
