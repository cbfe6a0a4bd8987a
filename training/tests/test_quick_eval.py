"""Tests of training.quick_eval as a command: the guidance/step sweep over a committed checkpoint,
the autoencoder-reconstruction floor and the ODE-pair targets' scores that docs/FASHION.md
quotes."""

import contextlib
import io
import json
import os
import tempfile
import unittest

import numpy as np
import torch

from training import common, quick_eval
from training.eval import fashion_data


class ReconstructionTest(unittest.TestCase):
    def test_scores_real_and_reconstructed_images_on_the_same_split(self):
        results = quick_eval.reconstruction(200)
        real, rec = results["real"], results["reconstructed"]
        for r in (real, rec):
            self.assertEqual(r["num_images"], 200)
            self.assertEqual(r["num_reference"], 9800)
        # Same images, so the same labels: real images score the classifier's own accuracy and
        # the committed autoencoder keeps nearly all of it (0.90 vs 0.93 measured at 320).
        self.assertGreater(real["class_accuracy"], 0.85)
        self.assertGreater(rec["class_accuracy"], 0.8)
        self.assertLess(real["fid"], rec["fid"])
        self.assertLess(abs(real["mean_pixel"] - rec["mean_pixel"]), 5)


class PairTargetsTest(unittest.TestCase):
    def test_scores_the_decoded_latents_of_a_pair_file_with_its_labels(self):
        # A pair file whose x0 are the scaled latents of real test images: its "teacher images"
        # are then the autoencoder's reconstructions, which keep the classifier's accuracy
        # (0.90 measured at 320) and the real mean pixel. Labels out of order score near chance
        # (0.12 with them reversed).
        images, labels = fashion_data.load_split("test")
        rng = np.random.default_rng(0)
        chosen = rng.choice(len(images), 200, replace=False)
        model, scaling_factor = common.load_autoencoder(common.AUTOENCODER_CHECKPOINT)
        with torch.no_grad():
            x = torch.from_numpy(images[chosen].astype(np.float32) / 127.5 - 1.0)[:, None]
            mean, _ = model.encoder(x)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "pairs.pt")
            torch.save({"x0": mean * scaling_factor, "labels": torch.from_numpy(labels[chosen]),
                        "steps": 50, "guidance": 2.0}, path)
            out = os.path.join(tmp, "targets.json")
            with contextlib.redirect_stdout(io.StringIO()) as text:
                quick_eval.main(["--pairs", path, "--json", out])
            with open(out) as f:
                result = json.load(f)[path]
        self.assertEqual(result["num_images"], 200)
        self.assertEqual(result["guidance"], 2.0)
        self.assertGreater(result["class_accuracy"], 0.8)
        self.assertLess(abs(result["mean_pixel"] - float(images[chosen].mean())), 5)
        self.assertIn("(200, CFG 2)", text.getvalue())


class CommandTest(unittest.TestCase):
    def test_sweep_writes_one_row_per_setting(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "sweep.json")
            text = io.StringIO()
            with contextlib.redirect_stdout(text):
                quick_eval.main(["--checkpoint", "training/checkpoints/teacher.pt",
                                 "--steps", "1", "2", "--guidance", "1", "3",
                                 "--per-class", "2", "--json", out])
            with open(out) as f:
                results = json.load(f)
        self.assertEqual(sorted(results), ["steps=1 guidance=1", "steps=1 guidance=3",
                                           "steps=2 guidance=1", "steps=2 guidance=3"])
        self.assertIn("| 2 steps, guidance 3 |", text.getvalue())
        for r in results.values():
            self.assertGreaterEqual(r["class_accuracy"], 0.0)
            self.assertLessEqual(r["class_accuracy"], 1.0)

    def test_needs_exactly_one_source(self):
        for argv in ([], ["--checkpoint", "x.pt", "--reconstruction", "10"],
                     ["--pairs", "p.pt", "--reconstruction", "10"]):
            with self.assertRaises(SystemExit) as cm, \
                    contextlib.redirect_stderr(io.StringIO()):
                quick_eval.main(argv)
            self.assertEqual(cm.exception.code, 2)


if __name__ == "__main__":
    unittest.main()
