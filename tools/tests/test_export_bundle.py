"""Tests for tools/export_bundle.py: bundles exported from the tiny SD1.5 diffusers folder, their
manifest, their TorchScript files against the reference fixtures, and their images (through
tools/reference_pipeline.py, the served loop in Python) against DMD2 sampling written out
independently with the eager modules."""

import filecmp
import os
import tempfile
import unittest

import torch

from tools import export_bundle
from tools.sd15 import checkpoint_io
from tools.sd15.diffusers_folder import DiffusersFolder
from tools.tests import util

SIZES = [(128, 128), (96, 64)]  # 96x64: latent 12x8, not divisible by 8 (size-matched upsampling)


def setUpModule():
    torch.set_num_threads(1)


def export(out: str, *extra: str) -> str:
    code, err = util.run_quietly(export_bundle.main, [
        "--diffusers-dir", util.TINY_FOLDER, "--out", out, "--sizes", "128,96x64",
        "--batch-sizes", "1,2", *extra])
    if code != 0:
        raise AssertionError(err)
    return out


manifest = util.read_manifest

def prompts(seed: int) -> list:
    return [{"input_ids": v["input_ids_77"], "seed": seed + i}
            for i, v in enumerate(util.tokenizer_vectors()[:3])]


class DmdExportTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.base = export(os.path.join(cls.tmp.name, "base"), "--recipe", "dmd2-sd15-1step")
        cls.dmd = export(os.path.join(cls.tmp.name, "dmd"), "--recipe", "dmd2-sd15-1step",
                         "--unet-checkpoint", util.DMD_REPLACEMENT, "--name", "dmd2-tiny")
        cls.rp = util.reference_pipeline()
        folder = DiffusersFolder.open(util.TINY_FOLDER)
        cls.text_encoder = folder.load_text_encoder()
        cls.vae = folder.load_vae_decoder()
        cls.unets = {cls.base: folder.load_unet(),
                     cls.dmd: DiffusersFolder.open(util.TINY_FOLDER,
                                                   util.DMD_REPLACEMENT).load_unet()}

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_manifest_has_the_dmd2_recipe_and_the_folder_settings(self):
        m = manifest(self.base)
        self.assertEqual(m["format"], "dmdserve.bundle/v1")
        self.assertEqual(m["name"], "dmd2-sd15")
        self.assertEqual(manifest(self.dmd)["name"], "dmd2-tiny")
        self.assertEqual(m["image"], {"width": 128, "height": 128, "channels": 3,
                                      "supported_sizes": [[128, 128], [96, 64]]})
        self.assertEqual(m["latent"], {"channels": 4, "downsample_factor": 8})
        self.assertEqual(m["prediction_type"], "epsilon")
        self.assertEqual(m["schedule"]["timesteps"], [999])
        self.assertEqual(m["schedule"]["alphas_cumprod"], [util.SD15_ALPHA_999])
        self.assertEqual(m["guidance_scale"], 1.0)
        self.assertEqual(m["latent_scaling_factor"], util.SD15_SCALING)
        self.assertEqual(m["dtype"], "float32")
        self.assertEqual(m["batch_sizes"], [1, 2])
        self.assertEqual(m["max_images_per_request"], 2)
        self.assertEqual(m["tokenizer"]["max_length"], 77)
        self.assertEqual(m["tokenizer"]["pad_token"], "<|endoftext|>")
        for key, name in (("vocab", "vocab.json"), ("merges", "merges.txt")):
            self.assertTrue(filecmp.cmp(os.path.join(self.base, m["tokenizer"][key]),
                                        os.path.join(util.TINY_FOLDER, "tokenizer", name),
                                        shallow=False), name)

    def test_torchscript_files_reproduce_the_reference_outputs(self):
        files = {"text_encoder": "text_encoder.pt", "unet": "unet.pt",
                 "vae_decoder": "vae_decoder.pt"}
        for component, name in files.items():
            with self.subTest(component):
                module = torch.jit.load(os.path.join(self.base, name))
                inputs = util.fixture(component, "inputs.pt")
                expected = util.fixture(component, "outputs.pt")
                with torch.no_grad():
                    if component == "text_encoder":
                        got, want = module(inputs["input_ids"]), expected["last_hidden_state"]
                    elif component == "unet":
                        got = module(inputs["sample"], inputs["timestep"],
                                     inputs["encoder_hidden_states"])
                        want = expected["sample"]
                    else:
                        got, want = module(inputs["latents"]), expected["sample"]
                self.assertLessEqual(util.max_diff(got, want), 1e-4)

    def test_replacement_unet_weights_are_exported(self):
        exported = torch.jit.load(os.path.join(self.dmd, "unet.pt")).state_dict()
        expected = checkpoint_io.read_state_dict(util.DMD_REPLACEMENT)
        self.assertEqual(set(exported), set(expected))
        for k, v in expected.items():
            self.assertTrue(torch.equal(exported[k], v), k)

    def test_bundle_images_equal_independent_dmd2_sampling(self):
        for bundle in (self.base, self.dmd):
            for width, height in SIZES:
                with self.subTest(bundle=os.path.basename(bundle), size=(width, height)):
                    items = prompts(seed=11)
                    served = self.rp.run(bundle, items, width, height, [])
                    direct = util.dmd2_images(self.text_encoder, self.unets[bundle], self.vae,
                                              items, width, height)
                    self.assertEqual(tuple(served.shape), (3, height, width, 3))
                    diff = util.max_diff(served, direct)
                    print(f"[ diff ] {os.path.basename(bundle)} {width}x{height}: reference "
                          f"pipeline vs direct DMD2 sampling, max {diff:.0f} levels")
                    self.assertLessEqual(diff, 1)
                    self.assertGreater(served.float().std().item(), 10)  # not a flat image

    def test_replacement_changes_the_images(self):
        items = prompts(seed=3)
        base = self.rp.run(self.base, items, 128, 128, [])
        dmd = self.rp.run(self.dmd, items, 128, 128, [])
        self.assertGreater(util.max_diff(base, dmd), 50)


class ExportOptionsTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def test_ddim_recipe_with_guidance(self):
        out = export(os.path.join(self.tmp.name, "ddim"), "--recipe", "ddim", "--steps", "4",
                     "--guidance", "7.5")
        m = manifest(out)
        self.assertEqual(m["name"], "sd15-ddim4")
        # DDIMScheduler.set_timesteps(4) for SD1.5's config (leading spacing, steps_offset 1),
        # as stated in the tiny folder's README.
        self.assertEqual(m["schedule"]["timesteps"], [751, 501, 251, 1])
        self.assertEqual(m["schedule"]["step_mode"], "ddim")
        self.assertEqual(m["guidance_scale"], 7.5)
        # alphas_cumprod by its definition in docs/BUNDLE.md (SD's scaled-linear schedule).
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
        alphas = torch.cumprod(1 - betas, dim=0)
        self.assertEqual(m["schedule"]["alphas_cumprod"],
                         [float(alphas[t]) for t in (751, 501, 251, 1)])
        rp = util.reference_pipeline()
        image = rp.run(out, prompts(seed=5)[:1], 128, 128, rp.empty_prompt_ids(out, m))
        self.assertEqual(tuple(image.shape), (1, 128, 128, 3))

    def test_dtype_options_set_the_manifest_and_the_stored_weights(self):
        out = export(os.path.join(self.tmp.name, "bf16"), "--recipe", "dmd2-sd15-1step",
                     "--dtype", "bfloat16", "--decoder-dtype", "float32")
        self.assertEqual(manifest(out)["dtype"], {"text_encoder": "bfloat16",
                                                  "generator": "bfloat16",
                                                  "decoder": "float32"})
        for name, dtype in [("unet.pt", torch.bfloat16), ("text_encoder.pt", torch.bfloat16),
                            ("vae_decoder.pt", torch.float32)]:
            params = torch.jit.load(os.path.join(out, name)).state_dict().values()
            self.assertEqual({p.dtype for p in params}, {dtype}, name)
        image = util.reference_pipeline().run(out, prompts(seed=5)[:1], 128, 128, [])
        self.assertEqual(tuple(image.shape), (1, 128, 128, 3))

    def test_overwrite_writes_into_an_existing_bundle(self):
        out = export(os.path.join(self.tmp.name, "b"), "--recipe", "dmd2-sd15-1step")
        export(out, "--recipe", "ddim", "--steps", "2", "--overwrite")
        self.assertEqual(manifest(out)["schedule"]["timesteps"], [501, 1])

    def test_bad_inputs_give_clear_errors(self):
        sd = checkpoint_io.read_state_dict(util.DMD_REPLACEMENT)
        sd.pop("conv_out.weight")
        bad_unet = os.path.join(self.tmp.name, "bad_unet.bin")
        torch.save(sd, bad_unet)
        full = os.path.join(self.tmp.name, "full")
        os.makedirs(full)
        open(os.path.join(full, "model.json"), "w").close()
        dmd = ["--recipe", "dmd2-sd15-1step"]
        cases = [
            (["--recipe", "lcm"], 2, "invalid choice: 'lcm'"),
            (dmd + ["--steps", "4"], 1, "dmd2-sd15-1step is one step"),
            (["--recipe", "ddim", "--steps", "0"], 1, "steps must be in \\[1, 1000\\]"),
            (dmd + ["--sizes", "100"], 1, "divisible by the VAE's downsample factor 8"),
            (dmd + ["--sizes", "12x"], 2, "bad size '12x'"),
            (dmd + ["--batch-sizes", "2,1"], 1, "strictly increasing"),
            (dmd + ["--name", "my model"], 1, "name 'my model' must be"),
            (dmd + ["--unet-checkpoint", bad_unet], 1, "1 missing keys: conv_out.weight"),
            (dmd + ["--out", full], 1, "exists and is not an empty directory"),
        ]
        for extra, code, message in cases:
            with self.subTest(extra):
                got_code, err = util.run_quietly(export_bundle.main, [
                    "--diffusers-dir", util.TINY_FOLDER,
                    "--out", os.path.join(self.tmp.name, "out"), *extra])
                self.assertEqual(got_code, code, err)
                self.assertRegex(err, message)
        code, err = util.run_quietly(export_bundle.main, [
            "--diffusers-dir", os.path.join(self.tmp.name, "missing"), "--recipe",
            "dmd2-sd15-1step", "--out", os.path.join(self.tmp.name, "out")])
        self.assertEqual(code, 1)
        self.assertIn("missing: not a directory", err)


if __name__ == "__main__":
    unittest.main()
