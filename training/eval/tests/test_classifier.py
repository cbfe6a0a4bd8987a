"""Tests for the Fashion-MNIST loader, classifier, image loading and the committed checkpoint."""

import os
import tempfile
import unittest

import numpy as np
import torch
from PIL import Image

from training.eval import fashion_data, metrics
from training.eval.classifier import FashionClassifier, embed_images, load_classifier, to_input
from training.eval.evaluate_images import DEFAULT_CHECKPOINT, evaluate, load_image_dir
from training.eval.train_classifier import train

# Measured FID between two disjoint 5000-image halves of the test set with the committed
# checkpoint (see README.md); the threshold leaves a wide margin above it.
FID_FLOOR_THRESHOLD = 5.0  # Measured 1.6-2.1 over shuffle seeds 0-2.


def setUpModule():
    torch.set_num_threads(1)


class FashionDataTest(unittest.TestCase):
    def test_test_split_shape_padding_and_labels(self):
        images, labels = fashion_data.load_split("test")
        self.assertEqual(images.shape, (10000, 32, 32))
        self.assertEqual(images.dtype, np.uint8)
        self.assertEqual(np.bincount(labels).tolist(), [1000] * 10)
        border = np.concatenate([images[:, :2].ravel(), images[:, -2:].ravel(),
                                 images[:, :, :2].ravel(), images[:, :, -2:].ravel()])
        self.assertEqual(int(border.max()), 0)
        self.assertGreater(int(images[:, 2:-2, 2:-2].max()), 200)

    def test_rejects_unknown_split(self):
        with self.assertRaises(ValueError):
            fashion_data.load_split("validation")


class ClassifierTest(unittest.TestCase):
    def test_input_convention_and_output_shapes(self):
        images = np.array([np.zeros((32, 32)), np.full((32, 32), 255)], dtype=np.uint8)
        x = to_input(images)
        self.assertEqual(tuple(x.shape), (2, 1, 32, 32))
        self.assertEqual((x[0].min().item(), x[1].max().item()), (-1.0, 1.0))
        logits, features = embed_images(FashionClassifier(), images)
        self.assertEqual((logits.shape, features.shape), ((2, 10), (2, 128)))
        with self.assertRaises(ValueError):
            to_input(images.astype(np.float32))

    def test_loss_decreases_on_a_small_subset(self):
        torch.manual_seed(0)
        images, labels = fashion_data.load_split("train")
        model = FashionClassifier()
        losses = train(model, images[:1024], labels[:1024], epochs=2, batch_size=64, seed=0,
                       max_steps=30)
        self.assertEqual(len(losses), 30)
        self.assertLess(np.mean(losses[-5:]), 0.7 * np.mean(losses[:5]))

    def test_save_and_load_round_trip(self):
        model = FashionClassifier().eval()
        x = to_input(np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8))
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "c.pt")
            torch.save({"config": model.config, "state_dict": model.state_dict()}, path)
            loaded = load_classifier(path)
        with torch.no_grad():
            self.assertTrue(torch.equal(model(x), loaded(x)))


class LoadImageDirTest(unittest.TestCase):
    def test_reads_labels_pads_and_resizes(self):
        with tempfile.TemporaryDirectory() as directory:
            Image.fromarray(np.full((32, 32), 7, np.uint8)).save(
                os.path.join(directory, "3-0-seed1.png"))
            Image.fromarray(np.full((28, 28, 3), 200, np.uint8)).save(
                os.path.join(directory, "9-x.png"))
            Image.fromarray(np.full((64, 64), 50, np.uint8)).save(
                os.path.join(directory, "0-big.png"))
            open(os.path.join(directory, "notes.txt"), "w").close()
            images, labels, names = load_image_dir(directory)
            self.assertEqual(names, ["0-big.png", "3-0-seed1.png", "9-x.png"])
            self.assertEqual(labels.tolist(), [0, 3, 9])
            self.assertEqual(images.shape, (3, 32, 32))
            self.assertEqual(int(images[0].min()), 50)
            self.assertEqual(int(images[1].max()), 7)
            self.assertEqual((int(images[2, 0, 0]), int(images[2, 16, 16])), (0, 200))

            Image.fromarray(np.zeros((32, 32), np.uint8)).save(os.path.join(directory, "12-a.png"))
            with self.assertRaises(ValueError):
                load_image_dir(directory)


@unittest.skipUnless(os.path.exists(DEFAULT_CHECKPOINT), "no committed classifier checkpoint")
class CommittedCheckpointTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = load_classifier(DEFAULT_CHECKPOINT)
        cls.images, cls.labels = fashion_data.load_split("test")
        order = np.random.default_rng(0).permutation(len(cls.images))
        cls.half_a, cls.half_b = order[:5000], order[5000:]
        cls.floor = evaluate(cls.model, cls.images[cls.half_a], cls.labels[cls.half_a],
                             cls.images[cls.half_b], cls.labels[cls.half_b])

    def test_accuracy_on_2000_test_images(self):
        logits, _ = embed_images(self.model, self.images[:2000])
        self.assertGreaterEqual(metrics.class_accuracy(logits.argmax(1), self.labels[:2000]), 0.90)

    def test_real_halves_reach_the_floor(self):
        self.assertLess(self.floor["fid"], FID_FLOOR_THRESHOLD)
        self.assertGreater(self.floor["class_accuracy"], 0.90)
        self.assertGreater(self.floor["diversity_ratio"], 0.9)
        self.assertLess(self.floor["diversity_ratio"], 1.1)

    def test_constant_grey_images_score_far_worse(self):
        grey = np.full((500, 32, 32), 128, np.uint8)
        labels = np.arange(500) % 10
        result = evaluate(self.model, grey, labels, self.images[self.half_b[:2000]],
                          self.labels[self.half_b[:2000]])
        self.assertGreater(result["fid"], 20 * max(self.floor["fid"], 0.1))
        self.assertLess(result["diversity_ratio"], 0.05)
        self.assertLess(result["class_accuracy"], 0.2)


if __name__ == "__main__":
    unittest.main()
