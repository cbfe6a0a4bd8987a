"""Tests for training/data.py and training/captions.py."""

import collections
import gzip
import json
import os
import struct
import tempfile
import unittest

import numpy as np
import torch

from training import captions, data

VECTORS = os.path.join(captions.REPO_ROOT, "worker", "testdata", "clip_tokenizer_reference_vectors.jsonl")


class DataTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.train_x, cls.train_y = data.load_split("train")
        cls.test_x, cls.test_y = data.load_split("test")

    def test_shapes_and_types(self):
        self.assertEqual(tuple(self.train_x.shape), (60000, 1, 32, 32))
        self.assertEqual(tuple(self.test_x.shape), (10000, 1, 32, 32))
        self.assertEqual(self.train_x.dtype, torch.float32)
        self.assertEqual(tuple(self.train_y.shape), (60000,))
        self.assertEqual(tuple(self.test_y.shape), (10000,))

    def test_range_and_padding(self):
        for x in (self.train_x, self.test_x):
            self.assertEqual(x.min().item(), -1.0)
            self.assertEqual(x.max().item(), 1.0)
            border = torch.cat([x[..., :2, :].flatten(), x[..., -2:, :].flatten(),
                                x[..., :, :2].flatten(), x[..., :, -2:].flatten()])
            self.assertTrue(torch.all(border == -1.0))

    def test_pixels_match_raw_file(self):
        with gzip.open(os.path.join(data.DEFAULT_DIR, "t10k-images-idx3-ubyte.gz")) as f:
            raw = f.read()
        first = np.frombuffer(raw, dtype=np.uint8, count=28 * 28, offset=16).reshape(28, 28)
        expected = torch.from_numpy(first.astype(np.float32)) / 127.5 - 1.0
        self.assertTrue(torch.allclose(self.test_x[0, 0, 2:30, 2:30], expected))

    def test_labels_balanced(self):
        # Fashion-MNIST has exactly 6000 train and 1000 test images per class.
        self.assertEqual(collections.Counter(self.train_y.tolist()),
                         {k: 6000 for k in range(10)})
        self.assertEqual(collections.Counter(self.test_y.tolist()), {k: 1000 for k in range(10)})

    def test_subset_is_prefix(self):
        x, y = data.load_split("test", subset=100)
        self.assertTrue(torch.equal(x, self.test_x[:100]))
        self.assertTrue(torch.equal(y, self.test_y[:100]))

    def test_unknown_split(self):
        with self.assertRaisesRegex(ValueError, "valid"):
            data.load_split("valid")


class IdxErrorsTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def write(self, name, payload):
        path = os.path.join(self.tmp.name, name)
        with gzip.open(path, "wb") as f:
            f.write(payload)
        return path

    def test_valid_small_file(self):
        pixels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
        path = self.write("ok.gz", struct.pack(">IIII", 2051, 2, 3, 4) + pixels.tobytes())
        np.testing.assert_array_equal(data.read_idx_images(path), pixels)

    def test_bad_magic(self):
        path = self.write("bad.gz", struct.pack(">IIII", 2049, 1, 2, 2) + bytes(4))
        with self.assertRaisesRegex(data.IdxFormatError, "magic number 2049"):
            data.read_idx_images(path)

    def test_truncated_images(self):
        path = self.write("short.gz", struct.pack(">IIII", 2051, 2, 28, 28) + bytes(28 * 28))
        with self.assertRaisesRegex(data.IdxFormatError, "implies"):
            data.read_idx_images(path)

    def test_truncated_header(self):
        path = self.write("hdr.gz", struct.pack(">II", 2049, 5)[:6])
        with self.assertRaisesRegex(data.IdxFormatError, "too short"):
            data.read_idx_labels(path)

    def test_labels_count_mismatch(self):
        path = self.write("labels.gz", struct.pack(">II", 2049, 5) + bytes(3))
        with self.assertRaisesRegex(data.IdxFormatError, "implies 13"):
            data.read_idx_labels(path)

    def test_not_gzip(self):
        path = os.path.join(self.tmp.name, "plain.gz")
        with open(path, "wb") as f:
            f.write(b"not gzip at all")
        with self.assertRaisesRegex(data.IdxFormatError, "gzip"):
            data.read_idx_labels(path)

    def test_wrong_split_size(self):
        for name, payload in (
                ("t10k-images-idx3-ubyte.gz",
                 struct.pack(">IIII", 2051, 3, 28, 28) + bytes(3 * 784)),
                ("t10k-labels-idx1-ubyte.gz", struct.pack(">II", 2049, 3) + bytes(3))):
            self.write(name, payload)
        with self.assertRaisesRegex(data.IdxFormatError, "expected 10000"):
            data.load_split("test", data_dir=self.tmp.name)


class CaptionsTest(unittest.TestCase):
    def test_at_least_six_distinct_per_class(self):
        self.assertEqual(len(captions.CAPTIONS), 10)
        all_captions = [c for per_class in captions.CAPTIONS for c in per_class]
        for per_class in captions.CAPTIONS:
            self.assertGreaterEqual(len(per_class), 6)
        self.assertEqual(len(set(all_captions)), len(all_captions))

    def test_sampler_deterministic_and_in_class(self):
        labels = [i % 10 for i in range(2000)]
        a = captions.sample_captions(labels, seed=7)
        self.assertEqual(a, captions.sample_captions(labels, seed=7))
        self.assertNotEqual(a, captions.sample_captions(labels, seed=8))
        for label, caption in zip(labels, a):
            self.assertIn(caption, captions.CAPTIONS[label])
        # 200 draws per class over 7 phrasings: every phrasing should appear.
        self.assertEqual(set(a), {c for per_class in captions.CAPTIONS for c in per_class})

    def test_reproduces_shared_test_vectors(self):
        with open(VECTORS, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        self.assertGreater(len(records), 0)
        for record in records:
            with self.subTest(text=record["text"]):
                self.assertEqual(captions.tokenizer().encode(record["text"]), record["ids"])
                self.assertEqual(captions.input_ids(record["text"]), record["input_ids_77"])

    def test_tokenize_layout(self):
        ids = captions.tokenize(["a handbag", "x " * 100])
        self.assertEqual(tuple(ids.shape), (2, 77))
        self.assertEqual(ids.dtype, torch.int64)
        body = captions.tokenizer().encode("a handbag")
        self.assertEqual(ids[0, :len(body) + 2].tolist(), [49406] + body + [49407])
        self.assertTrue(torch.all(ids[0, len(body) + 2:] == 49407))
        # 100 text tokens are truncated to 75: BOS + 75 + EOS fills the row.
        self.assertEqual(ids[1, 0].item(), 49406)
        self.assertEqual(ids[1, 76].item(), 49407)
        self.assertTrue(torch.all(ids[1, 1:76] != 49407))


if __name__ == "__main__":
    unittest.main()
