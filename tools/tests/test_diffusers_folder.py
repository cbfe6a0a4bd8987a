"""Tests for tools/sd15/diffusers_folder.py on the tiny SD1.5 diffusers folder and broken copies
of it (files linked into temp dirs, some left out or replaced)."""

import json
import os
import tempfile
import unittest

import torch

from tools.sd15 import checkpoint_io
from tools.sd15.config import ConfigError
from tools.sd15.diffusers_folder import DiffusersFolder, FolderError
from tools.tests import util


def setUpModule():
    torch.set_num_threads(1)


def folder_variant(tmp: str, skip=(), write=None) -> str:
    """A copy of the tiny folder in tmp (files symlinked) without `skip` (relative paths) and
    with `write` ({relative path: str/bytes/dict}) written instead."""
    write = write or {}
    for root, _, files in os.walk(util.TINY_FOLDER):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), util.TINY_FOLDER)
            if rel in skip or rel in write:
                continue
            os.makedirs(os.path.join(tmp, os.path.dirname(rel)), exist_ok=True)
            os.symlink(os.path.join(root, name), os.path.join(tmp, rel))
    for rel, content in write.items():
        os.makedirs(os.path.join(tmp, os.path.dirname(rel)), exist_ok=True)
        if isinstance(content, dict):
            content = json.dumps(content)
        with open(os.path.join(tmp, rel), "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
    return tmp


class FolderTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def test_opens_the_tiny_folder(self):
        folder = DiffusersFolder.open(util.TINY_FOLDER)
        self.assertEqual(folder.unet_config["block_out_channels"], [16, 24, 32, 32])
        self.assertEqual(folder.vae_config["scaling_factor"], 0.18215)
        self.assertEqual(folder.text_config["hidden_size"], 32)
        self.assertEqual(folder.weights["unet"], os.path.join(
            util.TINY_FOLDER, "unet", "diffusion_pytorch_model.safetensors"))
        self.assertEqual(folder.weights["text_encoder"],
                         os.path.join(util.TINY_FOLDER, "text_encoder", "pytorch_model.bin"))
        self.assertEqual(folder.tokenizer_settings(),
                         {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                          "pad_token": "<|endoftext|>", "max_length": 77})

    def test_models_load_with_the_fixture_weights(self):
        folder = DiffusersFolder.open(util.TINY_FOLDER)
        cases = [(folder.load_text_encoder(), "text_encoder"), (folder.load_unet(), "unet"),
                 (folder.load_vae_decoder(), "vae_decoder")]
        for model, component in cases:
            with self.subTest(component):
                self.assertFalse(model.training)
                expected = util.fixture(component, "weights.pt")
                got = model.state_dict()
                self.assertEqual(list(got), list(expected))
                for k in expected:
                    self.assertTrue(torch.equal(got[k], expected[k]), k)

    def test_bin_weights_are_used_without_safetensors(self):
        path = folder_variant(self.tmp.name, skip=("unet/diffusion_pytorch_model.safetensors",
                                                   "vae/diffusion_pytorch_model.safetensors"))
        folder = DiffusersFolder.open(path)
        self.assertTrue(folder.weights["unet"].endswith("diffusion_pytorch_model.bin"))
        self.assertTrue(torch.equal(folder.load_vae_decoder().post_quant_conv.weight,
                                    util.fixture("vae_decoder", "weights.pt")
                                    ["post_quant_conv.weight"]))

    def test_replacement_unet_checkpoint(self):
        # unet/ needs only its config then (DMD2 users skip the 3.4 GB SD1.5 UNet download).
        path = folder_variant(self.tmp.name, skip=("unet/diffusion_pytorch_model.safetensors",
                                                   "unet/diffusion_pytorch_model.bin"))
        unet = DiffusersFolder.open(path, util.DMD_REPLACEMENT).load_unet()
        expected = checkpoint_io.read_state_dict(util.DMD_REPLACEMENT)
        base = util.fixture("unet", "weights.pt")
        for k, v in unet.state_dict().items():
            self.assertTrue(torch.equal(v, expected[k]), k)
            self.assertFalse(torch.equal(v, base[k]), k)

    def test_deprecated_vae_attention_names_are_renamed(self):
        sd = checkpoint_io.read_state_dict(
            os.path.join(util.TINY_FOLDER, "vae", "diffusion_pytorch_model.bin"))
        old = {}
        prefix = "decoder.mid_block.attentions.0."
        renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        for k, v in sd.items():
            for new, legacy in renames.items():
                if k.startswith(prefix + new + "."):
                    k = prefix + legacy + k[len(prefix + new):]
                    v = v[:, :, None, None] if v.dim() == 2 else v  # 1x1-conv layout
            old[k] = v
        self.assertIn(prefix + "proj_attn.weight", old)
        path = folder_variant(self.tmp.name, skip=("vae/diffusion_pytorch_model.safetensors",
                                                   "vae/diffusion_pytorch_model.bin"))
        torch.save(old, os.path.join(path, "vae", "diffusion_pytorch_model.bin"))
        vae = DiffusersFolder.open(path).load_vae_decoder()
        expected = util.fixture("vae_decoder", "weights.pt")
        for k, v in vae.state_dict().items():
            self.assertTrue(torch.equal(v, expected[k]), k)

    def test_missing_parts_are_all_listed(self):
        path = folder_variant(self.tmp.name, skip=(
            "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
            "tokenizer/merges.txt", "scheduler/scheduler_config.json", "vae/config.json"))
        with self.assertRaises(FolderError) as ctx:
            DiffusersFolder.open(path)
        message = str(ctx.exception)
        for part in ("missing unet weights (diffusion_pytorch_model.safetensors or "
                     "diffusion_pytorch_model.bin)", "missing tokenizer/merges.txt",
                     "missing scheduler/scheduler_config.json", "missing vae/config.json"):
            self.assertIn(part, message)

    def test_not_a_pipeline_folder(self):
        with self.assertRaisesRegex(FolderError, "not a directory"):
            DiffusersFolder.open(os.path.join(self.tmp.name, "nope"))
        with self.assertRaisesRegex(FolderError, "no model_index.json"):
            DiffusersFolder.open(self.tmp.name)

    def test_other_pipelines_are_rejected(self):
        with open(os.path.join(util.TINY_FOLDER, "model_index.json")) as f:
            index = json.load(f)
        sdxl = {**index, "_class_name": "StableDiffusionXLPipeline",
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
        path = folder_variant(os.path.join(self.tmp.name, "a"),
                              write={"model_index.json": sdxl})
        with self.assertRaisesRegex(FolderError, "StableDiffusionXLPipeline is not an SD1.5"):
            DiffusersFolder.open(path)
        other_unet = {**index, "unet": ["diffusers", "UNet2DModel"]}
        path = folder_variant(os.path.join(self.tmp.name, "b"),
                              write={"model_index.json": other_unet})
        with self.assertRaisesRegex(FolderError, "unet is \\['diffusers', 'UNet2DModel'\\]"):
            DiffusersFolder.open(path)

    def test_unsupported_config_names_the_folder(self):
        with open(os.path.join(util.TINY_FOLDER, "unet", "config.json")) as f:
            unet = json.load(f)
        path = folder_variant(self.tmp.name, write={
            "unet/config.json": {**unet, "use_linear_projection": True}})
        with self.assertRaisesRegex(ConfigError, f"^{path}: unet config: "
                                                 "use_linear_projection=True is not supported"):
            DiffusersFolder.open(path)

    def test_missing_replacement_checkpoint_is_listed(self):
        missing = os.path.join(self.tmp.name, "dmd2.bin")
        with self.assertRaisesRegex(FolderError, f"UNet checkpoint {missing}: no such file"):
            DiffusersFolder.open(util.TINY_FOLDER, missing)

    def test_inconsistent_components_are_rejected(self):
        with open(os.path.join(util.TINY_FOLDER, "unet", "config.json")) as f:
            unet = json.load(f)
        path = folder_variant(self.tmp.name,
                              write={"unet/config.json": {**unet, "cross_attention_dim": 64}})
        with self.assertRaisesRegex(FolderError, "cross_attention_dim 64 != text_encoder "
                                                 "hidden_size 32"):
            DiffusersFolder.open(path)

    def test_replacement_with_wrong_keys_names_them(self):
        sd = checkpoint_io.read_state_dict(util.DMD_REPLACEMENT)
        del sd["conv_in.bias"]
        sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)
        bad = os.path.join(self.tmp.name, "bad.bin")
        torch.save(sd, bad)
        with self.assertRaisesRegex(checkpoint_io.CheckpointError,
                                    "bad.bin: state dict does not match the model: 1 missing "
                                    "keys: conv_in.bias; 1 unexpected keys: "
                                    "model.diffusion_model.input_blocks.0.0.weight"):
            DiffusersFolder.open(util.TINY_FOLDER, bad).load_unet()


if __name__ == "__main__":
    unittest.main()
