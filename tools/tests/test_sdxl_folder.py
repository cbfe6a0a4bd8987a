"""Tests for tools/sd15/sdxl_folder.py and tokenizer_2's "!" handling in
tools/clip_tokenizer_reference.py, on the tiny SDXL diffusers folder of
tools/tests/testdata/sdxl-parity/tiny-sdxl-diffusers.

The repository keeps only that folder's configs, tokenizer configs and the stand-in DMD2 UNet
(see tools/tests/testdata/README.md); each test assembles the complete folder in a temp dir
with util.build_sdxl_folder."""

import json
import os
import shutil
import tempfile
import unittest

import torch

from tools.clip_tokenizer_reference import Tokenizer
from tools.sd15 import checkpoint_io
from tools.sd15.clip_text import sdxl_text_conditioning
from tools.sd15.diffusers_folder import DiffusersFolder, FolderError
from tools.sd15.sdxl_folder import SDXLFolder, is_sdxl_folder
from tools.tests import util

TINY_SDXL = util.TINY_SDXL
SDXL_DMD_REPLACEMENT = util.SDXL_DMD_REPLACEMENT
CLIP_VOCAB = util.CLIP_VOCAB
PROMPTS = util.SDXL_PROMPTS
WEIGHT_FILES = util.SDXL_WEIGHT_FILES
save_state_dict = util.save_state_dict
build_folder = util.build_sdxl_folder


def setUpModule():
    torch.set_num_threads(1)


def fixture(component: str, name: str) -> dict:
    return util.fixture(component, name, root=util.SDXL_PARITY)


def assert_state_dict_equal(test: unittest.TestCase, got: dict, expected: dict) -> None:
    test.assertEqual(list(got), list(expected))
    for k in expected:
        test.assertTrue(torch.equal(got[k], expected[k]), k)


class SDXLFolderTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp()
        cls.folder_path = build_folder(cls.tmp)
        cls.folder = SDXLFolder.open(cls.folder_path)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)

    def test_reads_index_configs_and_weight_paths(self):
        f = self.folder
        self.assertTrue(is_sdxl_folder(self.folder_path))
        self.assertTrue(f.force_zeros_for_empty_prompt)
        self.assertEqual(f.vae_config["scaling_factor"], 0.13025)
        self.assertTrue(f.vae_force_upcast)
        self.assertEqual(f.unet_config["block_out_channels"], [12, 16, 24])
        self.assertEqual(f.unet_config["transformer_layers_per_block"], [1, 2, 10])
        self.assertEqual(f.text_config["hidden_act"], "quick_gelu")
        self.assertEqual(f.text_2_config["hidden_act"], "gelu")
        self.assertEqual(f.text_2_config["projection_dim"], 20)
        self.assertEqual(f.scheduler_config["_class_name"], "EulerDiscreteScheduler")
        self.assertEqual(f.scheduler_config["timestep_spacing"], "leading")
        self.assertEqual(f.weights["vae"], os.path.join(
            self.folder_path, "vae", "diffusion_pytorch_model.safetensors"))
        self.assertEqual(f.weights["text_encoder_2"], os.path.join(
            self.folder_path, "text_encoder_2", "pytorch_model.bin"))

    def test_tokenizer_settings(self):
        common = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "max_length": 77}
        self.assertEqual(self.folder.tokenizer_settings("tokenizer"),
                         {**common, "pad_token": "<|endoftext|>"})
        self.assertEqual(self.folder.tokenizer_settings("tokenizer_2"),
                         {**common, "pad_token": "!"})

    def test_models_load_strictly_with_the_fixture_weights(self):
        f = self.folder
        for model, component in [(f.load_unet(), "unet"), (f.load_text_encoder(), "text_encoder"),
                                 (f.load_text_encoder_2(), "text_encoder_2")]:
            with self.subTest(component):
                self.assertFalse(model.training)
                assert_state_dict_equal(self, model.state_dict(),
                                        fixture(component, "weights.pt"))
        # SDXL's VAE is SD1.5's decode path: sd-parity's tiny decoder under an SDXL config.
        assert_state_dict_equal(self, f.load_vae_decoder().state_dict(),
                                util.fixture("vae_decoder", "weights.pt"))

    def test_tokenizers_give_the_fixture_input_ids(self):
        for name, component in [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]:
            with self.subTest(name):
                tok = self.folder.reference_tokenizer(name)
                rows = [tok.for_model(tok.encode(p))[0] for p in PROMPTS]
                self.assertEqual(rows, fixture(component, "inputs.pt")["input_ids"].tolist())
        # tokenizer_2's ids differ from EOS padding, so the check above sees the pad token.
        eos_padded = Tokenizer(self.folder.tokenizer_dirs["tokenizer_2"])
        rows = [eos_padded.for_model(eos_padded.encode(p))[0] for p in PROMPTS]
        self.assertNotEqual(rows, fixture("text_encoder_2", "inputs.pt")["input_ids"].tolist())

    def test_conditioning_from_the_folder_matches_the_unet_fixture_inputs(self):
        f = self.folder
        ids = [f.reference_tokenizer(n) for n in ("tokenizer", "tokenizer_2")]
        rows = [torch.tensor([t.for_model(t.encode(p))[0] for p in PROMPTS[:2]]) for t in ids]
        with torch.no_grad():
            states, text_embeds = sdxl_text_conditioning(
                f.load_text_encoder(), f.load_text_encoder_2(), rows[0], rows[1])
        expected = fixture("unet", "inputs.pt")
        # The fixture's arrays are the encoders' outputs on these ids (same float32 kernels).
        self.assertLess(util.max_diff(states, expected["encoder_hidden_states"]), 1e-5)
        self.assertLess(util.max_diff(text_embeds, expected["text_embeds"]), 1e-5)

    def test_legacy_position_ids_are_ignored(self):
        with tempfile.TemporaryDirectory() as tmp:
            legacy = {"text_model.embeddings.position_ids": torch.arange(77)[None]}
            path = build_folder(tmp, text_encoder_extra=legacy)
            assert_state_dict_equal(self, SDXLFolder.open(path).load_text_encoder().state_dict(),
                                    fixture("text_encoder", "weights.pt"))

    def test_replacement_unet_loads_and_differs(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = build_folder(tmp, skip=(os.path.join("unet", WEIGHT_FILES["unet"]),))
            unet = SDXLFolder.open(path, SDXL_DMD_REPLACEMENT).load_unet()
        expected = checkpoint_io.read_state_dict(SDXL_DMD_REPLACEMENT)
        base = fixture("unet", "weights.pt")
        got = unet.state_dict()
        self.assertEqual(list(got), list(base))
        for k, v in got.items():
            self.assertTrue(torch.equal(v, expected[k]), k)
            self.assertFalse(torch.equal(v, base[k]), k)

    def test_replacement_with_wrong_keys_names_them(self):
        sd = checkpoint_io.read_state_dict(SDXL_DMD_REPLACEMENT)
        del sd["add_embedding.linear_1.bias"]
        with tempfile.TemporaryDirectory() as tmp:
            bad = os.path.join(tmp, "bad.bin")
            save_state_dict(sd, bad)
            with self.assertRaisesRegex(checkpoint_io.CheckpointError,
                                        "bad.bin: state dict does not match the model: 1 "
                                        "missing keys: add_embedding.linear_1.bias"):
                SDXLFolder.open(self.folder_path, bad).load_unet()

    def test_missing_parts_are_all_listed(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = build_folder(tmp, skip=(
                "text_encoder_2/pytorch_model.bin", "tokenizer_2/merges.txt",
                "text_encoder_2/config.json", "scheduler/scheduler_config.json"))
            with self.assertRaises(FolderError) as ctx:
                SDXLFolder.open(path)
        message = str(ctx.exception)
        self.assertIn("not a usable SDXL diffusers folder", message)
        for part in ("missing text_encoder_2 weights (model.safetensors or pytorch_model.bin)",
                     "missing text_encoder_2/config.json", "missing tokenizer_2/merges.txt",
                     "missing scheduler/scheduler_config.json"):
            self.assertIn(part, message)

    def test_sd15_folder_is_not_sdxl(self):
        self.assertFalse(is_sdxl_folder(util.TINY_FOLDER))
        with self.assertRaisesRegex(FolderError, "_class_name is 'StableDiffusionPipeline', "
                                                 "expected 'StableDiffusionXLPipeline'"):
            SDXLFolder.open(util.TINY_FOLDER)
        # The SD1.5 loader still refuses SDXL folders and still reads its own.
        with self.assertRaisesRegex(FolderError, "StableDiffusionXLPipeline is not an SD1.5"):
            DiffusersFolder.open(self.folder_path)
        self.assertEqual(DiffusersFolder.open(util.TINY_FOLDER).vae_config["scaling_factor"],
                         0.18215)

    def test_inconsistent_widths_are_rejected(self):
        with open(os.path.join(TINY_SDXL, "unet", "config.json")) as f:
            unet = json.load(f)
        with tempfile.TemporaryDirectory() as tmp:
            path = build_folder(tmp, skip=("unet/config.json",))
            with open(os.path.join(path, "unet", "config.json"), "w") as f:
                json.dump({**unet, "projection_class_embeddings_input_dim": 84}, f)
            with self.assertRaisesRegex(FolderError, "projection_class_embeddings_input_dim 84 "
                                                     "!= 6 time ids x 10 \\+ text_encoder_2 "
                                                     "projection_dim 20"):
                SDXLFolder.open(path)


class Tokenizer2Test(unittest.TestCase):
    """tokenizer_2 (pad "!") against the facts of the sdxl-parity README."""

    @classmethod
    def setUpClass(cls):
        cls.tok = Tokenizer(CLIP_VOCAB)
        cls.tok2 = Tokenizer(CLIP_VOCAB, pad_token="!")

    def test_pad_ids(self):
        self.assertEqual(self.tok.pad, 49407)
        self.assertEqual(self.tok2.pad, 0)
        self.assertEqual(Tokenizer(CLIP_VOCAB, pad_token="<|endoftext|>").pad, 49407)
        row, _ = self.tok2.for_model(self.tok2.encode("a cat"))
        self.assertEqual(row, [49406, 320, 2368, 49407] + [0] * 73)

    def test_exclamation_marks_become_pad_ids(self):
        # README: "A Photo of an Ankle-Boot!!" -> ... 8087, 0, 0, 49407 with tokenizer_2,
        # ... 8087, 748, 49407 with tokenizer / openai's tokenizer (748 = "!!").
        text = "A Photo of an Ankle-Boot!!"
        self.assertEqual(self.tok.encode(text)[-2:], [8087, 748])
        self.assertEqual(self.tok2.encode(text), self.tok.encode(text)[:-1] + [0, 0])
        row, _ = self.tok2.for_model(self.tok2.encode(text))
        self.assertEqual(row[7:11], [8087, 0, 0, 49407])
        # "wow!!! a cat! hello!?" -> wow 0 0 0 a cat 0 hello 0 ?
        word = {w: self.tok.encode(w) for w in ("wow", "a cat", "hello", "?")}
        self.assertEqual(self.tok2.encode("wow!!! a cat! hello!?"),
                         word["wow"] + [0, 0, 0] + word["a cat"] + [0] + word["hello"] + [0]
                         + word["?"])

    def test_text_without_exclamation_marks_is_unchanged(self):
        for record in util.tokenizer_vectors():
            if "!" in record["text"]:
                continue
            with self.subTest(record["text"]):
                self.assertEqual(self.tok2.encode(record["text"]), record["ids"])

    def test_unknown_pad_token_is_rejected(self):
        with self.assertRaisesRegex(ValueError, "pad token '<pad>' is not in"):
            Tokenizer(CLIP_VOCAB, pad_token="<pad>")


if __name__ == "__main__":
    unittest.main()
