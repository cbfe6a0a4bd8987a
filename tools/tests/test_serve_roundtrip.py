"""Export -> serve -> image: bundles exported from the tiny SD1.5 diffusers folder (with and
without the DMD2-style replacement UNet), served by the real dmdserve binary, queried over gRPC.

Each served image must be within 1 intensity level of (a) tools/reference_pipeline.py on the
same bundle and (b) DMD2 sampling written out independently with the eager modules, for the same
token ids (from the CLIP tokenizer reference vectors) and seed: this checks the noise contract
(docs/BUNDLE.md) end to end. Needs the environment CTest sets for integration tests
(tests/CMakeLists.txt): DMDSERVE_BIN, PYTHONPATH with tests/integration and the gRPC stubs.
"""

import os
import tempfile
import unittest

import torch

from harness import pb
from tools.sd15.diffusers_folder import DiffusersFolder
from tools.tests import util
from tools.tests.test_export_bundle import export

SIZES = [(128, 128), (96, 64)]


def setUpModule():
    torch.set_num_threads(1)


class ServeRoundTripTest(util.ServedBundlesTestCase, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.bundles = {
            "tiny-sd15": export(os.path.join(cls.tmp.name, "base"), "--recipe",
                                "dmd2-sd15-1step", "--name", "tiny-sd15"),
            "tiny-dmd2": export(os.path.join(cls.tmp.name, "dmd"), "--recipe", "dmd2-sd15-1step",
                                "--name", "tiny-dmd2", "--unet-checkpoint", util.DMD_REPLACEMENT),
        }
        folder = DiffusersFolder.open(util.TINY_FOLDER)
        cls.text_encoder = folder.load_text_encoder()
        cls.vae = folder.load_vae_decoder()
        dmd_folder = DiffusersFolder.open(util.TINY_FOLDER, util.DMD_REPLACEMENT)
        cls.unets = {"tiny-sd15": folder.load_unet(), "tiny-dmd2": dmd_folder.load_unet()}
        cls.rp = util.reference_pipeline()
        cls.start_server()

    def test_models_are_listed_with_the_exported_settings(self):
        models = {m.name: m for m in
                  self.server.stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
        self.assertEqual(set(models), set(self.bundles))
        for m in models.values():
            self.assertTrue(m.ready)
            self.assertEqual((m.width, m.height, m.channels, m.steps), (128, 128, 3, 1))
            self.assertEqual([(s.width, s.height) for s in m.supported_sizes], SIZES)
            self.assertEqual(m.max_tokens, 77)

    def test_served_images_match_the_python_references(self):
        vectors = util.tokenizer_vectors()[:2]
        for model, bundle in self.bundles.items():
            for width, height in SIZES:
                for k, vector in enumerate(vectors):
                    seed = 1000 * k + width
                    with self.subTest(model=model, size=(width, height), prompt=vector["text"]):
                        reply = self.server.stub.Generate(pb.GenerateRequest(
                            model=model, prompt=vector["text"], num_images=2, seed=seed,
                            width=width, height=height, encoding=pb.IMAGE_ENCODING_RAW),
                            timeout=120)
                        served = torch.stack([
                            torch.frombuffer(bytearray(i.data), dtype=torch.uint8)
                            .reshape(height, width, 3) for i in reply.images])
                        items = [{"input_ids": vector["input_ids_77"], "seed": seed + i}
                                 for i in range(2)]
                        reference = self.rp.run(bundle, items, width, height, [])
                        direct = util.dmd2_images(self.text_encoder, self.unets[model],
                                                  self.vae, items, width, height)
                        d_ref = util.max_diff(served, reference)
                        d_direct = util.max_diff(served, direct)
                        print(f"[ diff ] {model} {width}x{height} seed {seed}: served vs "
                              f"reference_pipeline {d_ref:.0f}, vs direct DMD2 {d_direct:.0f} "
                              "levels")
                        self.assertLessEqual(d_ref, 1)
                        self.assertLessEqual(d_direct, 1)
                        self.assertGreater(util.max_diff(served[0], served[1]), 10)


if __name__ == "__main__":
    unittest.main()
