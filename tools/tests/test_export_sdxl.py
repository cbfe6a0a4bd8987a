"""Tests for SDXL exports (tools/export_bundle.py on the tiny SDXL folder, dmdserve.bundle/v2):
each recipe's manifest, the TorchScript files against the parity fixtures and the eager models,
the replacement UNet, tokenizer_2 handling, dtype defaults, --timesteps, clear errors for bad
recipe/folder/step combinations, and tools/reference_pipeline.py's v2 inputs. The images of
every recipe are compared with independent sampling in test_sdxl_sampling.py."""

import filecmp
import json
import math
import os
import subprocess
import sys
import tempfile
import unittest

import torch

from tools import export_bundle
from tools.sd15 import checkpoint_io
from tools.sd15.clip_text import SDXLTextEncoders
from tools.sd15.sdxl_folder import SDXLFolder
from tools.tests import util

SDXL_ALPHAS = {999: 0.0046600960195064545, 749: 0.05662345513701439, 499: 0.2776694595813751,
               399: 0.4260861575603485, 249: 0.6754320859909058}  # sdxl-parity README
# sqrt(1 - alphas_cumprod[999]): diffusers' Euler with trailing spacing starts at sigma_max.
TRAILING_START_999 = math.sqrt(1 - SDXL_ALPHAS[999])
BOOT = "A Photo of an Ankle-Boot!!"


def setUpModule():
    torch.set_num_threads(1)


def run_export(folder: str, out: str, *extra: str):
    return util.run_quietly(export_bundle.main, [
        "--diffusers-dir", folder, "--out", out, "--batch-sizes", "1,2", *extra])


def export(folder: str, out: str, *extra: str) -> str:
    code, err = run_export(folder, out, *extra)
    if code != 0:
        raise AssertionError(err)
    return out


manifest = util.read_manifest

def alphas(timesteps: list) -> list:
    """alphas_cumprod at `timesteps` by docs/BUNDLE.md's definition (SD's scaled-linear)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    cumprod = torch.cumprod(1 - betas, dim=0)
    return [float(cumprod[t]) for t in timesteps]


class SDXLExportTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.folder_path = util.build_sdxl_folder(cls.tmp.name)
        cls.folder = SDXLFolder.open(cls.folder_path)
        cls.dmd4 = export(cls.folder_path, cls.out("dmd4"), "--recipe", "dmd2-sdxl-4step",
                          "--dtype", "bfloat16")
        cls.dmd1 = export(cls.folder_path, cls.out("dmd1"), "--recipe", "dmd2-sdxl-1step",
                          "--unet-checkpoint", util.SDXL_DMD_REPLACEMENT, "--sizes",
                          "128,96x64")
        tok, tok_2 = (cls.folder.reference_tokenizer(n) for n in ("tokenizer", "tokenizer_2"))
        cls.boot = {"input_ids": tok.for_model(tok.encode(BOOT))[0],
                    "input_ids_2": tok_2.for_model(tok_2.encode(BOOT))[0], "seed": 5}

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    @classmethod
    def out(cls, name: str) -> str:
        return os.path.join(cls.tmp.name, name)

    def test_dmd2_4step_manifest(self):
        m = manifest(self.dmd4)
        self.assertEqual(m["format"], "dmdserve.bundle/v2")
        self.assertEqual(m["name"], "dmd2-sdxl-4step")
        self.assertEqual(m["image"], {"width": 128, "height": 128, "channels": 3,
                                      "supported_sizes": [[128, 128]]})
        self.assertEqual(m["tokenizer"], {"vocab": "tokenizer/vocab.json",
                                          "merges": "tokenizer/merges.txt",
                                          "bos_token": "<|startoftext|>",
                                          "eos_token": "<|endoftext|>",
                                          "pad_token": "<|endoftext|>", "max_length": 77})
        # tokenizer_2's BPE files are tokenizer's: the bundle points at the same copies.
        self.assertEqual(m["tokenizer_2"], {**m["tokenizer"], "pad_token": "!"})
        self.assertFalse(os.path.exists(os.path.join(self.dmd4, "tokenizer_2")))
        self.assertEqual(m["conditioning"], "text_time")
        self.assertEqual(m["unconditional"], "zeros")
        self.assertEqual(m["components"], {"text_encoder": "text_encoders.pt",
                                           "generator": "unet.pt", "decoder": "vae_decoder.pt"})
        self.assertEqual(m["prediction_type"], "epsilon")
        self.assertEqual(m["schedule"], {"timesteps": [999, 749, 499, 249],
                                         "alphas_cumprod": alphas([999, 749, 499, 249]),
                                         "step_mode": "renoise"})
        self.assertEqual(m["schedule"]["alphas_cumprod"],
                         [SDXL_ALPHAS[t] for t in (999, 749, 499, 249)])
        self.assertEqual(m["guidance_scale"], 1.0)
        self.assertEqual(m["latent_scaling_factor"], 0.13025)
        # The SDXL VAE overflows in float16: the decoder stays float32 by default.
        self.assertEqual(m["dtype"], {"text_encoder": "bfloat16", "generator": "bfloat16",
                                      "decoder": "float32"})
        for name, dtype in [("text_encoders.pt", torch.bfloat16), ("unet.pt", torch.bfloat16),
                            ("vae_decoder.pt", torch.float32)]:
            params = torch.jit.load(os.path.join(self.dmd4, name)).state_dict().values()
            self.assertEqual({p.dtype for p in params}, {dtype}, name)
        for f in ("vocab.json", "merges.txt"):
            self.assertTrue(filecmp.cmp(os.path.join(self.dmd4, "tokenizer", f),
                                        os.path.join(util.CLIP_VOCAB, f), shallow=False))
        # The manifest lists every top-level field in the order of docs/BUNDLE.md's example.
        self.assertEqual(list(m), ["format", "name", "description", "image", "latent",
                                   "tokenizer", "tokenizer_2", "conditioning", "unconditional",
                                   "components", "prediction_type", "schedule",
                                   "guidance_scale", "latent_scaling_factor", "dtype",
                                   "batch_sizes", "max_images_per_request"])

    def test_recipe_schedules(self):
        trailing = {"initial_noise_scale": TRAILING_START_999}
        cases = [
            (["--recipe", "dmd2-sdxl-1step"], "dmd2-sdxl-1step", [399], "ddim", {}, 1.0),
            (["--recipe", "sdxl-turbo"], "sdxl-turbo", [999], "ddim", trailing, 1.0),
            (["--recipe", "sdxl-lightning", "--steps", "2"], "sdxl-lightning-2step",
             [999, 499], "ddim", trailing, 1.0),
            (["--recipe", "sdxl-lightning", "--steps", "4"], "sdxl-lightning-4step",
             [999, 749, 499, 249], "ddim", trailing, 1.0),
            (["--recipe", "sdxl-lightning", "--steps", "8"], "sdxl-lightning-8step",
             [999, 874, 749, 624, 499, 374, 249, 124], "ddim", trailing, 1.0),
            # The teacher: SDXL base's leading spacing starts at sqrt(sigma_max^2 + 1), i.e.
            # the UNet sees randn itself (no initial_noise_scale); guidance 5 by default.
            (["--recipe", "ddim", "--steps", "4"], "sdxl-ddim4", [751, 501, 251, 1], "ddim",
             {}, 5.0),
            (["--recipe", "ddim", "--steps", "2", "--guidance", "7"], "sdxl-ddim2", [501, 1],
             "ddim", {}, 7.0),
            (["--recipe", "dmd2-sdxl-4step", "--timesteps", "999,499"], "dmd2-sdxl-4step",
             [999, 499], "renoise", {}, 1.0),
            # A replaced list recomputes the trailing start from its first timestep.
            (["--recipe", "sdxl-lightning", "--steps", "2", "--timesteps", "749,249"],
             "sdxl-lightning-2step", [749, 249], "ddim",
             {"initial_noise_scale": math.sqrt(1 - SDXL_ALPHAS[749])}, 1.0),
        ]
        for k, (args, name, timesteps, mode, extra, guidance) in enumerate(cases):
            with self.subTest(args):
                m = manifest(export(self.folder_path, self.out(f"r{k}"), *args))
                self.assertEqual(m["format"], "dmdserve.bundle/v2")
                self.assertEqual(m["name"], name)
                self.assertEqual(m["schedule"], {"timesteps": timesteps,
                                                 "alphas_cumprod": alphas(timesteps),
                                                 "step_mode": mode, **extra})
                self.assertEqual(m["guidance_scale"], guidance)
                self.assertEqual(m["unconditional"], "zeros")
                self.assertEqual(m["dtype"], "float32")
        self.assertAlmostEqual(TRAILING_START_999, 0.99766723, places=7)

    def test_replacement_unet_weights_are_exported(self):
        exported = torch.jit.load(os.path.join(self.dmd1, "unet.pt")).state_dict()
        expected = checkpoint_io.read_state_dict(util.SDXL_DMD_REPLACEMENT)
        self.assertEqual(list(exported), list(expected))
        for k, v in expected.items():
            self.assertTrue(torch.equal(exported[k], v), k)
        m = manifest(self.dmd1)
        self.assertEqual(m["image"]["supported_sizes"], [[128, 128], [96, 64]])
        self.assertIn("exported from unet_dmd_replacement.bin", m["description"])

    def test_torchscript_files_equal_the_eager_models_and_the_fixtures(self):
        f = self.folder
        text = torch.jit.load(os.path.join(self.dmd1, "text_encoders.pt"))
        unet = torch.jit.load(os.path.join(self.dmd1, "unet.pt"))
        decoder = torch.jit.load(os.path.join(self.dmd1, "vae_decoder.pt"))
        ids = util.fixture("text_encoder", "inputs.pt", util.SDXL_PARITY)["input_ids"]
        ids_2 = util.fixture("text_encoder_2", "inputs.pt", util.SDXL_PARITY)["input_ids"]
        unet_in = util.fixture("unet", "inputs.pt", util.SDXL_PARITY)
        eager_unet = SDXLFolder.open(self.folder_path, util.SDXL_DMD_REPLACEMENT).load_unet()
        base_unet = torch.jit.load(os.path.join(self.dmd4, "unet.pt")).float()
        args = (unet_in["sample"], unet_in["timestep"], unet_in["encoder_hidden_states"],
                unet_in["text_embeds"], unet_in["time_ids"])
        with torch.no_grad():
            states, pooled = text(ids, ids_2)
            eager = SDXLTextEncoders(f.load_text_encoder(), f.load_text_encoder_2())(ids, ids_2)
            got_unet, want_unet = unet(*args), eager_unet(*args)
            got_base = base_unet(*args)
            got_image = decoder(util.fixture("vae_decoder", "inputs.pt")["latents"])
        self.assertEqual(tuple(states.shape), (3, 77, 40))
        self.assertEqual(tuple(pooled.shape), (3, 20))
        self.assertEqual(util.max_diff(states, eager[0]), 0)
        self.assertEqual(util.max_diff(pooled, eager[1]), 0)
        # The text fixtures' first two prompts are the UNet fixture's conditioning.
        self.assertLessEqual(util.max_diff(states[:2], unet_in["encoder_hidden_states"]), 1e-5)
        self.assertLessEqual(util.max_diff(pooled[:2], unet_in["text_embeds"]), 1e-5)
        self.assertEqual(util.max_diff(got_unet, want_unet), 0)
        self.assertLessEqual(util.max_diff(
            got_base, util.fixture("unet", "outputs.pt", util.SDXL_PARITY)["sample"]), 1e-4)
        self.assertGreater(util.max_diff(got_unet, got_base), 0.1)  # the replacement differs
        self.assertLessEqual(util.max_diff(
            got_image, util.fixture("vae_decoder", "outputs.pt")["sample"]), 1e-4)

    def test_reference_pipeline_reads_both_token_lists(self):
        rp = util.reference_pipeline()
        loaded = rp.load(self.dmd1)
        same = dict(self.boot, seed=self.boot["seed"])
        eos_padded = dict(self.boot, input_ids_2=self.boot["input_ids"])
        images = rp.sample(loaded, [self.boot, same, eos_padded], 96, 64, [])
        # Same ids and seed: identical; only input_ids_2 differs: a different image.
        self.assertLessEqual(util.max_diff(images[0], images[1]), 1)
        self.assertGreater(util.max_diff(images[0], images[2]), 10)
        alone = rp.sample(loaded, [eos_padded], 96, 64, [])
        self.assertLessEqual(util.max_diff(alone[0], images[2]), 1)

    def test_reference_pipeline_command_line_takes_input_ids_2(self):
        out = os.path.join(self.tmp.name, "images.u8")
        subprocess.run([sys.executable, "-m", "tools.reference_pipeline", "--bundle", self.dmd1,
                        "--inputs-json", json.dumps([self.boot]), "--width", "96", "--height",
                        "64", "--out", out], check=True, cwd=util.REPO_ROOT)
        with open(out, "rb") as f:
            got = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).reshape(1, 64, 96, 3)
        want = util.reference_pipeline().run(self.dmd1, [self.boot], 96, 64, [])
        self.assertTrue(torch.equal(got, want))

    def test_empty_prompt_unconditional_uses_both_tokenizers(self):
        """A folder that does not force zeros: "unconditional": "empty_prompt", and guidance runs
        the text encoder on both tokenizers' empty prompts (BOS, EOS, pad...)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = util.build_sdxl_folder(tmp, skip=("model_index.json",))
            with open(os.path.join(util.TINY_SDXL, "model_index.json"), encoding="utf-8") as f:
                index = json.load(f)
            with open(os.path.join(path, "model_index.json"), "w", encoding="utf-8") as f:
                json.dump({**index, "force_zeros_for_empty_prompt": False}, f)
            out = export(path, os.path.join(tmp, "b"), "--recipe", "ddim", "--steps", "1",
                         "--guidance", "3")
            m = manifest(out)
            self.assertEqual(m["unconditional"], "empty_prompt")
            rp = util.reference_pipeline()
            empty = [49406, 49407] + [49407] * 75
            empty_2 = [49406, 49407] + [0] * 75
            self.assertEqual(rp.empty_prompt_ids(out, m), empty)
            self.assertEqual(rp.empty_prompt_ids(out, m, "tokenizer_2"), empty_2)
            loaded = rp.load(out)
            default = rp.sample(loaded, [self.boot], 96, 64, empty)
            explicit = rp.sample(loaded, [self.boot], 96, 64, empty, empty_2)
            self.assertTrue(torch.equal(default, explicit))
            wrong = rp.sample(loaded, [self.boot], 96, 64, empty, empty)
            self.assertGreater(util.max_diff(default, wrong), 1)
            zeros = dict(loaded, manifest={**m, "unconditional": "zeros"})
            self.assertGreater(util.max_diff(default, rp.sample(zeros, [self.boot], 96, 64,
                                                                empty)), 10)

    def test_different_tokenizer_2_files_are_copied(self):
        with tempfile.TemporaryDirectory() as tmp:
            merges = os.path.join("tokenizer_2", "merges.txt")
            path = util.build_sdxl_folder(tmp, skip=(merges,))
            with open(os.path.join(util.CLIP_VOCAB, "merges.txt"), encoding="utf-8") as f:
                lines = f.read().split("\n")
            with open(os.path.join(path, merges), "w", encoding="utf-8") as f:
                f.write("\n".join(lines[:-2]) + "\n")  # one merge fewer
            out = export(path, os.path.join(tmp, "b"), "--recipe", "dmd2-sdxl-1step")
            m = manifest(out)
            self.assertEqual(m["tokenizer_2"]["vocab"], "tokenizer_2/vocab.json")
            self.assertEqual(m["tokenizer_2"]["merges"], "tokenizer_2/merges.txt")
            for name in ("vocab.json", "merges.txt"):
                self.assertTrue(filecmp.cmp(os.path.join(out, "tokenizer_2", name),
                                            os.path.join(path, "tokenizer_2", name),
                                            shallow=False))
            self.assertFalse(filecmp.cmp(os.path.join(out, "tokenizer_2", "merges.txt"),
                                         os.path.join(out, "tokenizer", "merges.txt"),
                                         shallow=False))

    def test_decoder_dtype_option_and_fp16_safe_vae(self):
        out = export(self.folder_path, self.out("bf16"), "--recipe", "dmd2-sdxl-1step",
                     "--dtype", "bfloat16", "--decoder-dtype", "bfloat16")
        self.assertEqual(manifest(out)["dtype"], "bfloat16")
        with tempfile.TemporaryDirectory() as tmp:
            path = util.build_sdxl_folder(tmp, skip=("vae/config.json",))
            with open(os.path.join(util.TINY_SDXL, "vae", "config.json"), encoding="utf-8") as f:
                vae = json.load(f)
            with open(os.path.join(path, "vae", "config.json"), "w", encoding="utf-8") as f:
                json.dump({**vae, "force_upcast": False}, f)
            out = export(path, os.path.join(tmp, "b"), "--recipe", "dmd2-sdxl-1step",
                         "--dtype", "bfloat16")
            self.assertEqual(manifest(out)["dtype"], "bfloat16")

    def test_bad_combinations_give_clear_errors(self):
        sdxl, sd15 = self.folder_path, util.TINY_FOLDER
        cases = [
            (sdxl, ["--recipe", "dmd2-sd15-1step"], 1,
             "recipe dmd2-sd15-1step is for SD1.5 checkpoints, but .* is an SDXL pipeline "
             "\\(its recipes: dmd2-sdxl-4step, dmd2-sdxl-1step, sdxl-turbo, sdxl-lightning, "
             "ddim\\)"),
            (sd15, ["--recipe", "dmd2-sdxl-4step"], 1,
             "recipe dmd2-sdxl-4step is for SDXL checkpoints, but .* is an SD1.5 pipeline"),
            (sd15, ["--recipe", "sdxl-turbo"], 1, "recipe sdxl-turbo is for SDXL checkpoints"),
            (sdxl, ["--recipe", "lcm"], 2, "invalid choice: 'lcm'"),
            (sdxl, ["--recipe", "sdxl-lightning"], 1,
             "sdxl-lightning needs --steps 2, 4 or 8, .*; none was given"),
            (sdxl, ["--recipe", "sdxl-lightning", "--steps", "1"], 1,
             "its 1-step UNet predicts x0 and is not supported\\); got 1"),
            (sdxl, ["--recipe", "sdxl-lightning", "--steps", "3"], 1, "got 3"),
            (sdxl, ["--recipe", "sdxl-lightning", "--steps", "4", "--guidance", "2"], 1,
             "sdxl-lightning has no guidance"),
            (sdxl, ["--recipe", "sdxl-turbo", "--steps", "2"], 1,
             "sdxl-turbo is one step without guidance"),
            (sdxl, ["--recipe", "dmd2-sdxl-4step", "--steps", "2"], 1,
             "dmd2-sdxl-4step is 4 steps without guidance"),
            (sdxl, ["--recipe", "dmd2-sdxl-1step", "--guidance", "4"], 1,
             "dmd2-sdxl-1step is one step without guidance"),
            (sdxl, ["--recipe", "ddim", "--guidance", "0.5"], 1, "guidance must be >= 1"),
            (sdxl, ["--recipe", "ddim", "--steps", "0"], 1, "steps must be in \\[1, 1000\\]"),
            (sdxl, ["--recipe", "sdxl-turbo", "--timesteps", "999,999"], 1,
             "--timesteps: \\[999, 999\\] must be strictly decreasing"),
            (sdxl, ["--recipe", "sdxl-turbo", "--timesteps", "499,999"], 1,
             "must be strictly decreasing"),
            (sdxl, ["--recipe", "dmd2-sdxl-4step", "--timesteps", "1000,500"], 1,
             "--timesteps: timestep 1000 is outside \\[0, 1000\\)"),
            (sdxl, ["--recipe", "dmd2-sdxl-4step", "--timesteps", "999,-1"], 1,
             "timestep -1 is outside"),
            (sdxl, ["--recipe", "dmd2-sdxl-4step", "--timesteps", "999,x"], 2,
             "bad list '999,x'"),
            (sdxl, ["--recipe", "ddim", "--steps", "3", "--timesteps", "999,499"], 1,
             "--steps 3 disagrees with the 2 --timesteps \\[999, 499\\]"),
            (sdxl, ["--recipe", "dmd2-sdxl-1step", "--sizes", "100"], 1,
             "divisible by the VAE's downsample factor 8"),
        ]
        for folder, extra, code, message in cases:
            with self.subTest(extra):
                out = os.path.join(self.tmp.name, "never")
                got_code, err = run_export(folder, out, *extra)
                self.assertEqual(got_code, code, err)
                self.assertRegex(err, message)
                self.assertFalse(os.path.exists(out))

    def test_sd15_export_with_timesteps_stays_v1(self):
        out = export(util.TINY_FOLDER, self.out("sd15"), "--recipe", "ddim", "--timesteps",
                     "900,500,100", "--guidance", "3")
        m = manifest(out)
        self.assertEqual(m["format"], "dmdserve.bundle/v1")
        self.assertEqual(m["name"], "sd15-ddim3")
        self.assertEqual(m["schedule"], {"timesteps": [900, 500, 100],
                                         "alphas_cumprod": alphas([900, 500, 100]),
                                         "step_mode": "ddim"})
        for field in ("tokenizer_2", "conditioning", "unconditional"):
            self.assertNotIn(field, m)


if __name__ == "__main__":
    unittest.main()
