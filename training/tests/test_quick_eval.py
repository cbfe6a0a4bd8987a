"""Tests of training.quick_eval as a command: the guidance/step sweep over a committed checkpoint
and the autoencoder-reconstruction floor that docs/FASHION.md quotes."""

import contextlib
import io
import json
import os
import tempfile
import unittest

from training import quick_eval


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
        for argv in ([], ["--checkpoint", "x.pt", "--reconstruction", "10"]):
            with self.assertRaises(SystemExit) as cm, \
                    contextlib.redirect_stderr(io.StringIO()):
                quick_eval.main(argv)
            self.assertEqual(cm.exception.code, 2)


if __name__ == "__main__":
    unittest.main()
