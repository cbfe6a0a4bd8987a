"""Export -> serve -> image for SDXL: dmdserve.bundle/v2 bundles exported from the tiny SDXL
diffusers folder with every SDXL recipe (DMD2 4-step and, with the stand-in DMD2 UNet, 1-step;
SDXL-Turbo; SDXL-Lightning; the teacher with guidance and zero unconditional embeddings), served
by the real dmdserve binary, queried over gRPC with prompt text.

Each served image must be within 1 intensity level of (a) tools/reference_pipeline.py on the
same bundle and (b) diffusers-style sampling written out independently on the eager models
(tools/tests/sdxl_loops.py), for the token ids the reference tokenizers give (tokenizer_2 pads
with "!" and turns each "!" of the prompt into the pad id, so the "!!" prompt checks dmdserve's
second tokenizer) and the same seeds: the v2 noise contract, conditioning and time ids end to
end. Needs the environment CTest sets for integration tests (tests/CMakeLists.txt): DMDSERVE_BIN,
PYTHONPATH with tests/integration and the gRPC stubs.
"""

import os
import tempfile
import unittest

import torch

from harness import pb
from tools.sd15.sdxl_folder import SDXLFolder
from tools.tests import sdxl_loops, util
from tools.tests.test_sdxl_sampling import export, models, sdxl_items

SIZES = [(96, 64), (64, 96)]
PROMPTS = ["A Photo of an Ankle-Boot!!", "a photo of a cat"]


def setUpModule():
    torch.set_num_threads(1)


class ServeSDXLRoundTripTest(util.ServedBundlesTestCase, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        path = util.build_sdxl_folder(cls.tmp.name)
        cls.folder = SDXLFolder.open(path)
        m = models(cls.folder)
        dmd = m._replace(unet=SDXLFolder.open(path, util.SDXL_DMD_REPLACEMENT).load_unet())
        trailing = sdxl_loops.euler_timesteps
        # model name -> (export arguments, steps, independent sampler(items, width, height))
        cases = {
            "sdxl-dmd2-4step": (["--recipe", "dmd2-sdxl-4step"], 4, lambda i, w, h: (
                sdxl_loops.lcm_images(m, i, w, h, [999, 749, 499, 249]))),
            "sdxl-dmd2-1step": (
                ["--recipe", "dmd2-sdxl-1step", "--unet-checkpoint", util.SDXL_DMD_REPLACEMENT],
                1, lambda i, w, h: sdxl_loops.lcm_images(dmd, i, w, h, [399])),
            "sdxl-turbo": (["--recipe", "sdxl-turbo"], 1, lambda i, w, h: (
                sdxl_loops.euler_images(m, i, w, h, [999], "trailing"))),
            "sdxl-lightning": (["--recipe", "sdxl-lightning", "--steps", "2"], 2,
                               lambda i, w, h: sdxl_loops.euler_images(
                                   m, i, w, h, trailing(2, "trailing"), "trailing")),
            "sdxl-teacher": (["--recipe", "ddim", "--steps", "3", "--guidance", "5"], 3,
                             lambda i, w, h: sdxl_loops.euler_images(
                                 m, i, w, h, trailing(3, "leading"), "leading", 5.0)),
        }
        cls.cases = cases
        cls.bundles = {name: export(path, os.path.join(cls.tmp.name, name), *args, "--name",
                                    name, "--batch-sizes", "1,2")
                       for name, (args, _, _) in cases.items()}
        cls.rp = util.reference_pipeline()
        cls.start_server()

    def test_models_are_listed_with_the_exported_settings(self):
        listed = {m.name: m for m in
                  self.server.stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
        self.assertEqual(set(listed), set(self.bundles))
        for name, m in listed.items():
            with self.subTest(name):
                self.assertTrue(m.ready)
                self.assertEqual((m.width, m.height, m.channels, m.steps),
                                 (96, 64, 3, self.cases[name][1]))
                self.assertEqual([(s.width, s.height) for s in m.supported_sizes], SIZES)
                self.assertEqual(m.max_tokens, 77)

    def test_served_images_match_the_python_references(self):
        for model, bundle in self.bundles.items():
            loaded = self.rp.load(bundle)
            sampler = self.cases[model][2]
            for width, height in SIZES:
                for k, prompt in enumerate(PROMPTS):
                    seed = 1000 * k + width
                    with self.subTest(model=model, size=(width, height), prompt=prompt):
                        reply = self.server.stub.Generate(pb.GenerateRequest(
                            model=model, prompt=prompt, num_images=2, seed=seed, width=width,
                            height=height, encoding=pb.IMAGE_ENCODING_RAW), timeout=120)
                        served = torch.stack([
                            torch.frombuffer(bytearray(i.data), dtype=torch.uint8)
                            .reshape(height, width, 3) for i in reply.images])
                        items = sdxl_items(self.folder, [prompt] * 2, [seed, seed + 1])
                        reference = self.rp.sample(loaded, items, width, height, [])
                        direct = sampler(items, width, height)
                        d_ref = util.max_diff(served, reference)
                        d_direct = util.max_diff(served, direct)
                        print(f"[ diff ] {model} {width}x{height} seed {seed}: served vs "
                              f"reference_pipeline {d_ref:.0f}, vs independent sampling "
                              f"{d_direct:.0f} levels")
                        self.assertLessEqual(d_ref, 1)
                        self.assertLessEqual(d_direct, 1)
                        self.assertGreater(util.max_diff(served[0], served[1]), 10)


if __name__ == "__main__":
    unittest.main()
