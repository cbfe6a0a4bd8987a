"""Tests for tools/sd15/checkpoint_io.py: the safetensors parser (valid and corrupt files written
here), torch.save files, and strict state-dict loading with readable mismatch reports."""

import collections
import json
import os
import struct
import tempfile
import unittest

import torch
from torch import nn

from tools.sd15 import checkpoint_io as io
from tools.tests import util

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
               torch.bool: "BOOL", torch.int8: "I8", torch.int16: "I16"}


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def safetensors_file(header, data: bytes, pad_to: int = 8) -> bytes:
    """Bytes of a safetensors file with `header` (a dict, or raw bytes) and data buffer."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % pad_to)
    return struct.pack("<Q", len(raw)) + raw + data


def encode(tensors: dict, metadata=None) -> bytes:
    """A valid safetensors file of `tensors` (in the given order), written from the format spec."""
    header = {"__metadata__": metadata} if metadata is not None else {}
    data = b""
    for name, t in tensors.items():
        blob = tensor_bytes(t)
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    return safetensors_file(header, data)


class SafetensorsTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def write(self, content: bytes, name="x.safetensors") -> str:
        path = os.path.join(self.tmp.name, name)
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_reads_every_dtype_and_shape(self):
        # Packed without padding: several tensors start at offsets that are not multiples of
        # their element size (f64 at byte 86, for example).
        g = torch.Generator().manual_seed(0)
        tensors = {
            "f32": torch.randn(3, 5, generator=g),
            "f16": torch.randn(7, generator=g).half(),
            "bf16": torch.randn(2, 3, generator=g).bfloat16(),
            "f64": torch.randn(2, generator=g).double(),
            "i64": torch.arange(-3, 4),
            "i32": torch.tensor([[1, -2], [3, 4]], dtype=torch.int32),
            "u8": torch.tensor([0, 255, 7], dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]),
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 4),
            "i8": torch.tensor([-1, 2], dtype=torch.int8),
            "late_f32": torch.randn(4, generator=g),
        }
        path = self.write(encode(tensors, metadata={"format": "pt"}))
        got = io.read_safetensors(path)
        self.assertEqual(list(got), list(tensors))
        for name, t in tensors.items():
            with self.subTest(name):
                self.assertEqual(got[name].dtype, t.dtype)
                self.assertEqual(got[name].shape, t.shape)
                self.assertTrue(torch.equal(got[name], t))

    def test_unaligned_tensor_is_read_correctly(self):
        tensors = {"a": torch.tensor([1, 2, 3], dtype=torch.uint8), "b": torch.randn(5)}
        got = io.read_safetensors(self.write(encode(tensors)))
        self.assertTrue(torch.equal(got["b"], tensors["b"]))

    def test_tiny_folder_files_equal_their_bin_copies(self):
        for component in ("unet", "vae"):
            with self.subTest(component):
                folder = os.path.join(util.TINY_FOLDER, component)
                st = io.read_state_dict(os.path.join(folder,
                                                     "diffusion_pytorch_model.safetensors"))
                pt = io.read_state_dict(os.path.join(folder, "diffusion_pytorch_model.bin"))
                self.assertEqual(set(st), set(pt))
                for k in pt:
                    self.assertTrue(torch.equal(st[k], pt[k]), k)

    def test_corrupt_files_are_rejected_with_the_reason(self):
        ok = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
        data8 = bytes(8)
        cases = {
            "short": (b"\x01\x02", "too short"),
            "length_past_end": (struct.pack("<Q", 1 << 40) + b"{}", "exceeds the file"),
            "not_json": (safetensors_file(b"{not json", b""), "not valid UTF-8 JSON"),
            "not_utf8": (safetensors_file(b'{"\xff": 1}', b""), "not valid UTF-8 JSON"),
            "not_object": (safetensors_file([1, 2], b""), "must be a JSON object"),
            "duplicate": (safetensors_file(
                b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', data8),
                "duplicate key 'a'"),
            "metadata": (safetensors_file({"__metadata__": {"format": 1}, "a": ok}, data8),
                         "__metadata__ must map strings to strings"),
            "fields": (safetensors_file({"a": {"dtype": "F32", "shape": [2]}}, data8),
                       "tensor 'a': entry must have exactly"),
            "dtype": (safetensors_file({"a": {**ok, "dtype": "F8_E4M3"}}, data8),
                      "tensor 'a': unsupported dtype 'F8_E4M3'"),
            "shape": (safetensors_file({"a": {**ok, "shape": [2, -1]}}, data8),
                      "tensor 'a': shape must be a list of non-negative ints"),
            "offsets_type": (safetensors_file({"a": {**ok, "data_offsets": [0]}}, data8),
                             "tensor 'a': data_offsets must be"),
            "out_of_bounds": (safetensors_file({"a": {**ok, "data_offsets": [0, 16]}}, data8),
                              "out of bounds of the 8-byte data buffer"),
            "reversed": (safetensors_file({"a": {**ok, "data_offsets": [8, 0]}}, data8),
                         "out of bounds"),
            "size": (safetensors_file({"a": {**ok, "shape": [3]}}, data8),
                     "hold 8 bytes, but F32 \\[3\\] needs 12"),
            "overlap": (safetensors_file(
                {"a": ok, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, data8),
                "overlap another tensor"),
            "gap": (safetensors_file(
                {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, data8),
                "gap of 4 bytes"),
            "trailing": (safetensors_file({"a": ok}, bytes(12)),
                         "4 bytes after the last tensor"),
        }
        for name, (content, message) in cases.items():
            with self.subTest(name):
                path = self.write(content, name + ".safetensors")
                with self.assertRaisesRegex(io.CheckpointError, message) as ctx:
                    io.read_safetensors(path)
                self.assertIn(path, str(ctx.exception))

    def test_missing_file(self):
        with self.assertRaisesRegex(io.CheckpointError, "cannot read"):
            io.read_safetensors(os.path.join(self.tmp.name, "nope.safetensors"))


class TorchFileTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def save(self, obj, name="x.bin") -> str:
        path = os.path.join(self.tmp.name, name)
        torch.save(obj, path)
        return path

    def test_reads_an_ordered_dict_state_dict_with_metadata(self):
        # What diffusers, transformers and DMD2 write: an OrderedDict with a _metadata attribute.
        sd = io.read_state_dict(util.DMD_REPLACEMENT)
        self.assertEqual(list(sd), [k for k, _ in util.key_list("unet_sd15_keys.txt")])
        self.assertTrue(all(isinstance(v, torch.Tensor) for v in sd.values()))

    def test_plain_and_ordered_dicts_round_trip(self):
        sd = collections.OrderedDict(w=torch.randn(3, 2), ids=torch.arange(4))
        for suffix in (".bin", ".pt", ".pth"):
            got = io.read_state_dict(self.save(sd, "m" + suffix))
            self.assertEqual(list(got), ["w", "ids"])
            self.assertTrue(torch.equal(got["w"], sd["w"]))

    def test_bad_contents_are_rejected(self):
        cases = {
            "list.bin": ([torch.zeros(1)], "expected a state dict .* got list"),
            "value.bin": ({"w": torch.zeros(1), "step": 5}, "entry 'step' is a int"),
            "code.bin": (nn.Linear(2, 2), "not a readable torch checkpoint"),  # not weights-only
        }
        for name, (obj, message) in cases.items():
            with self.subTest(name):
                with self.assertRaisesRegex(io.CheckpointError, message):
                    io.read_state_dict(self.save(obj, name))
        garbage = os.path.join(self.tmp.name, "garbage.bin")
        with open(garbage, "wb") as f:
            f.write(b"definitely not a zip file")
        with self.assertRaisesRegex(io.CheckpointError, "not a readable torch checkpoint"):
            io.read_state_dict(garbage)
        with self.assertRaisesRegex(io.CheckpointError, "no such file"):
            io.read_state_dict(os.path.join(self.tmp.name, "missing.bin"))
        with self.assertRaisesRegex(io.CheckpointError, "unknown checkpoint format"):
            io.read_state_dict(os.path.join(self.tmp.name, "model.ckpt"))


class StrictLoadTest(unittest.TestCase):
    def test_exact_match_loads_and_converts_dtype(self):
        model = nn.Linear(3, 2)
        sd = {"weight": torch.ones(2, 3, dtype=torch.float16), "bias": torch.zeros(2)}
        io.load_strict(model, sd, "m")
        self.assertTrue(torch.equal(model.weight, torch.ones(2, 3)))
        self.assertEqual(model.weight.dtype, torch.float32)

    def test_mismatch_report_lists_a_few_names_of_each_kind(self):
        model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(8)])
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        for i in range(7):
            del sd[f"{i}.bias"]
        sd["extra.weight"] = torch.zeros(1)
        sd["7.weight"] = torch.zeros(3, 2)
        with self.assertRaises(io.CheckpointError) as ctx:
            io.load_strict(model, sd, "ckpt.bin")
        message = str(ctx.exception)
        self.assertIn("ckpt.bin: state dict does not match the model", message)
        self.assertIn("7 missing keys: 0.bias, 1.bias, 2.bias, 3.bias, 4.bias, ... (2 more)",
                      message)
        self.assertIn("1 unexpected keys: extra.weight", message)
        self.assertIn("1 shape mismatches: 7.weight [3, 2] (model: [2, 2])", message)

    def test_meta_module_is_materialised(self):
        from tools.sd15.blocks import meta_device
        with meta_device():
            model = nn.Linear(3, 2)
        self.assertTrue(model.weight.is_meta)
        sd = {"weight": torch.randn(2, 3), "bias": torch.randn(2)}
        io.load_strict(model, sd, "m")
        self.assertFalse(model.weight.is_meta)
        self.assertTrue(torch.equal(model.bias, sd["bias"]))


if __name__ == "__main__":
    unittest.main()
