"""Smoke test of the whole training pipeline (training/): every stage runs a few iterations on a few
hundred Fashion-MNIST images, both bundles are exported, and the real server loads and serves them
with the images the Python reference loop computes (within 1 intensity level)."""
import json
import os
import subprocess
import tempfile
import unittest

import numpy as np

from harness import SOURCE_DIR, Server, pb

PY = os.environ.get("DMDSERVE_PYTHON", "/usr/bin/python3")


def stage(module, *args):
    subprocess.run([PY, "-m", module, *args], cwd=SOURCE_DIR, check=True,
                   stdout=subprocess.DEVNULL)


class FashionTrainingSmokeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        t = lambda name: os.path.join(cls.tmp.name, name)  # noqa: E731
        stage("training.train_autoencoder", "--steps", "2", "--subset", "300", "--batch-size",
              "16", "--out", t("ae.pt"), "--state", t("ae_state.pt"))
        stage("training.eval.train_classifier", "--epochs", "1", "--subset", "300", "--out",
              t("classifier.pt"))
        stage("training.train_teacher", "--steps", "2", "--subset", "300", "--batch-size", "8",
              "--channels", "16", "--autoencoder", t("ae.pt"), "--out", t("teacher.pt"),
              "--state", t("teacher_state.pt"))
        stage("training.make_ode_pairs", "--teacher", t("teacher.pt"), "--count", "16",
              "--steps", "2", "--guidance", "2", "--out", t("pairs.pt"))
        stage("training.train_dmd", "--teacher", t("teacher.pt"), "--autoencoder", t("ae.pt"),
              "--steps", "2", "--subset", "300", "--batch-size", "4", "--fake-steps", "2",
              "--reg-weight", "0.25", "--pairs", t("pairs.pt"), "--eval-every", "2",
              "--eval-per-class", "2", "--out", t("dmd.pt"), "--state", t("dmd_state.pt"))
        cls.bundles = {"smoke-dmd": t("smoke-dmd"), "smoke-teacher": t("smoke-teacher")}
        stage("training.export_fashion_bundle", "--checkpoint", t("dmd.pt"), "--autoencoder",
              t("ae.pt"), "--name", "smoke-dmd", "--steps", "1", "--out", t("smoke-dmd"))
        stage("training.export_fashion_bundle", "--checkpoint", t("teacher.pt"), "--autoencoder",
              t("ae.pt"), "--name", "smoke-teacher", "--steps", "4", "--guidance", "2",
              "--out", t("smoke-teacher"))
        cls.server = Server(model_dirs=tuple(cls.bundles.values()))

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        cls.tmp.cleanup()

    def test_every_stage_wrote_its_output(self):
        for name in ("ae.pt", "classifier.pt", "teacher.pt", "teacher.json", "pairs.pt",
                     "dmd.pt", "dmd.json"):
            self.assertTrue(os.path.exists(os.path.join(self.tmp.name, name)), name)
        with open(os.path.join(self.tmp.name, "dmd.json")) as f:
            summary = json.load(f)
        self.assertEqual([e["step"] for e in summary["evals"]], [0, 2])

    def test_server_serves_both_bundles_like_the_reference(self):
        models = {m.name for m in self.server.stub.ListModels(pb.ListModelsRequest(),
                                                               timeout=10).models}
        self.assertEqual(models, set(self.bundles))
        prompt = "a photo of a sneaker"
        ids = self.server.stub.Tokenize(pb.TokenizeRequest(model="smoke-dmd", text=prompt),
                                        timeout=10).input_ids
        for name, bundle in self.bundles.items():
            r = self.server.stub.Generate(pb.GenerateRequest(
                model=name, prompt=prompt, num_images=2, seed=5,
                encoding=pb.IMAGE_ENCODING_RAW), timeout=120)
            served = np.stack([np.frombuffer(i.data, np.uint8) for i in r.images])
            out = os.path.join(self.tmp.name, name + ".raw")
            inputs = json.dumps([{"input_ids": list(ids), "seed": s} for s in (5, 6)])
            subprocess.run([PY, "-m", "tools.reference_pipeline",
                            "--bundle", bundle, "--inputs-json", inputs, "--out", out],
                           check=True, cwd=SOURCE_DIR)
            reference = np.fromfile(out, np.uint8).reshape(served.shape)
            diff = np.abs(served.astype(int) - reference.astype(int)).max()
            self.assertLessEqual(diff, 1, name)
            self.assertGreater(served.std(), 0, name)


if __name__ == "__main__":
    unittest.main()
