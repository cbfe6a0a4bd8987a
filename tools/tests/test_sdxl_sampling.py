"""SDXL bundles sample exactly like the schedulers their recipes stand for: every SDXL recipe is
exported from the tiny SDXL folder, sampled with tools/reference_pipeline.py (the served loop in
Python) and compared with diffusers-style sampling written out independently on the eager
models (tools/tests/sdxl_loops.py): Euler in sigma space for SDXL-Turbo, SDXL-Lightning and the
teacher (with guidance and zero unconditional embeddings), LCM-style re-noising for DMD2. Token
ids come from the reference tokenizers (tokenizer_2 pads with "!" and turns every "!" of a prompt
into the pad id). Each image must be within 1 intensity level."""

import os
import tempfile
import unittest

import torch

from tools import export_bundle
from tools.sd15.sdxl_folder import SDXLFolder
from tools.tests import sdxl_loops, util

# 96x64: latent 12x8, whose deepest level is 3x2 (size-matched upsampling); 64x96 swaps height
# and width, so time ids in the wrong order would show.
SIZES = [(96, 64), (64, 96)]
PROMPTS = ["a photo of a cat", "A Photo of an Ankle-Boot!!", ""]


def setUpModule():
    torch.set_num_threads(1)


def export(folder: str, out: str, *extra: str) -> str:
    code, err = util.run_quietly(export_bundle.main, [
        "--diffusers-dir", folder, "--out", out, "--sizes", "96x64,64x96", "--batch-sizes",
        "1,4", *extra])
    if code != 0:
        raise AssertionError(err)
    return out


def sdxl_items(folder: SDXLFolder, prompts: list, seeds: list) -> list:
    """{"input_ids", "input_ids_2", "seed"} per (prompt, seed), from the folder's tokenizers."""
    tok, tok_2 = folder.reference_tokenizer("tokenizer"), folder.reference_tokenizer("tokenizer_2")
    return [{"input_ids": tok.for_model(tok.encode(p))[0],
             "input_ids_2": tok_2.for_model(tok_2.encode(p))[0], "seed": s}
            for p, s in zip(prompts, seeds)]


def models(folder: SDXLFolder) -> sdxl_loops.Models:
    return sdxl_loops.Models(folder.load_text_encoder(), folder.load_text_encoder_2(),
                             folder.load_unet(), folder.load_vae_decoder(),
                             float(folder.vae_config["scaling_factor"]))


class SDXLSamplingTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        path = util.build_sdxl_folder(cls.tmp.name)
        cls.folder = SDXLFolder.open(path)
        cls.models = models(cls.folder)
        cls.dmd_models = cls.models._replace(
            unet=SDXLFolder.open(path, util.SDXL_DMD_REPLACEMENT).load_unet())
        # Every prompt, two seeds for one of them, and a repeated prompt (encoded once).
        cls.items = sdxl_items(cls.folder, PROMPTS + PROMPTS[:1], [1, 2, 3, 4])
        trailing = sdxl_loops.euler_timesteps
        m, dmd = cls.models, cls.dmd_models
        # name -> (export arguments, independent sampler(items, width, height))
        cls.cases = {
            "dmd2-sdxl-4step": (["--recipe", "dmd2-sdxl-4step"], lambda i, w, h: (
                sdxl_loops.lcm_images(m, i, w, h, [999, 749, 499, 249]))),
            "dmd2-sdxl-1step": (["--recipe", "dmd2-sdxl-1step"], lambda i, w, h: (
                sdxl_loops.lcm_images(m, i, w, h, [399]))),
            "dmd2-sdxl-1step-replacement": (
                ["--recipe", "dmd2-sdxl-1step", "--unet-checkpoint", util.SDXL_DMD_REPLACEMENT],
                lambda i, w, h: sdxl_loops.lcm_images(dmd, i, w, h, [399])),
            "sdxl-turbo": (["--recipe", "sdxl-turbo"], lambda i, w, h: (
                sdxl_loops.euler_images(m, i, w, h, trailing(1, "trailing"), "trailing"))),
            "sdxl-turbo-t749": (["--recipe", "sdxl-turbo", "--timesteps", "749"],
                                lambda i, w, h: sdxl_loops.euler_images(m, i, w, h, [749],
                                                                        "trailing")),
            "sdxl-lightning-2step": (["--recipe", "sdxl-lightning", "--steps", "2"],
                                     lambda i, w, h: sdxl_loops.euler_images(
                                         m, i, w, h, trailing(2, "trailing"), "trailing")),
            "teacher-3step": (["--recipe", "ddim", "--steps", "3", "--guidance", "5"],
                              lambda i, w, h: sdxl_loops.euler_images(
                                  m, i, w, h, trailing(3, "leading"), "leading", 5.0)),
        }
        cls.bundles = {name: export(path, os.path.join(cls.tmp.name, name), *args)
                       for name, (args, _) in cls.cases.items()}

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_independent_loops_use_the_published_timesteps(self):
        self.assertEqual(sdxl_loops.euler_timesteps(2, "trailing"), [999, 499])
        self.assertEqual(sdxl_loops.euler_timesteps(8, "trailing"),
                         [999, 874, 749, 624, 499, 374, 249, 124])
        self.assertEqual(sdxl_loops.euler_timesteps(4, "leading"), [751, 501, 251, 1])

    def test_tokenizer_2_ids_differ_for_exclamation_marks(self):
        boot = self.items[1]
        self.assertEqual(boot["input_ids"][7:10], [8087, 748, 49407])
        self.assertEqual(boot["input_ids_2"][7:11], [8087, 0, 0, 49407])

    def test_bundle_images_equal_independent_sampling(self):
        rp = util.reference_pipeline()
        for name, (_, sampler) in self.cases.items():
            loaded = rp.load(self.bundles[name])
            for width, height in SIZES:
                with self.subTest(recipe=name, size=(width, height)):
                    served = rp.sample(loaded, self.items, width, height, [])
                    direct = sampler(self.items, width, height)
                    self.assertEqual(tuple(served.shape), (4, height, width, 3))
                    diff = util.max_diff(served, direct)
                    print(f"[ diff ] {name} {width}x{height}: reference pipeline vs "
                          f"independent sampling, max {diff:.0f} levels")
                    self.assertLessEqual(diff, 1)
                    # Different seeds of the same prompt differ; no image is flat.
                    self.assertGreater(util.max_diff(served[0], served[3]), 10)
                    self.assertGreater(served.float().std().item(), 10)

    def test_comparison_sees_the_initial_noise_scale(self):
        """Without initial_noise_scale (0.971 at t = 749) the bundle's images move by more than
        the tolerance: the comparison above checks the scale, not just the network."""
        rp = util.reference_pipeline()
        loaded = rp.load(self.bundles["sdxl-turbo-t749"])
        schedule = loaded["manifest"]["schedule"]
        self.assertAlmostEqual(schedule["initial_noise_scale"],
                               (1 - sdxl_loops.alphas_cumprod()[749].item()) ** 0.5, places=7)
        del schedule["initial_noise_scale"]
        without = rp.sample(loaded, self.items, 96, 64, [])
        direct = self.cases["sdxl-turbo-t749"][1](self.items, 96, 64)
        self.assertGreater(util.max_diff(without, direct), 3)

    def test_recipes_give_different_images(self):
        """Each comparison above would also pass for a wrong recipe if the recipes' images did
        not differ: they do, by many levels."""
        rp = util.reference_pipeline()
        images = {name: rp.run(bundle, self.items[:1], 96, 64, [])
                  for name, bundle in self.bundles.items()}
        names = sorted(images)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                with self.subTest(a=a, b=b):
                    self.assertGreater(util.max_diff(images[a], images[b]), 10)


if __name__ == "__main__":
    unittest.main()
