"""The benchmark's Python peer (scripts/bench/python_peer.py) serves the same model as dmdserve.

scripts/bench/bench_side_by_side.py compares dmdserve with this peer; the comparison means
something only if the peer computes the same images. Both of its modes (dynamic batcher, and
request threads without batching) serve tiny-random; each image must be within 1 grey level of
tools/reference_pipeline.py for the token ids dmdserve's own tokenizer gives (Tokenize on the real
server) and the seed of the noise contract, and equal to dmdserve's image within 1 grey level.
`dmdctl bench` must drive the peer without a failed request.
"""
import concurrent.futures
import json
import os
import sys
import unittest

import torch

from harness import BUILD_DIR, SOURCE_DIR, TINY_BUNDLE, Server, decode_png, pb, pb_grpc, run_dmdctl

import grpc

sys.path.insert(0, os.path.join(SOURCE_DIR, "scripts", "bench"))
from bench_common import PeerProcess  # noqa: E402
from tools import reference_pipeline  # noqa: E402

PROMPTS = ["a photo of a cat", "Ein rotes Kleid, sehr elegant!"]
SEED = 2**64 - 2  # image 1 wraps around to seed 0


def setUpModule():
    torch.set_num_threads(1)


class PythonPeerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dmdserve = Server("--warmup_runs=1")
        cls.peers = {}
        try:
            for mode, flags in {"batched": ["--max_batch_size=4", "--torch_threads=1"],
                                "unbatched": ["--max_batch_size=1", "--request_threads=2",
                                              "--torch_threads=1"]}.items():
                peer = PeerProcess(BUILD_DIR, TINY_BUNDLE, flags)
                cls.peers[mode] = peer
                peer.wait_ready(120)
        except BaseException:
            cls.tearDownClass()
            raise
        cls.loaded = reference_pipeline.load(TINY_BUNDLE)
        cls.uncond = reference_pipeline.empty_prompt_ids(TINY_BUNDLE, cls.loaded["manifest"])

    @classmethod
    def tearDownClass(cls):
        for peer in cls.peers.values():
            peer.stop()
        cls.dmdserve.stop()

    def peer_stub(self, mode):
        channel = grpc.insecure_channel(self.peers[mode].target)
        self.addCleanup(channel.close)
        return pb_grpc.ImageGenerationStub(channel)

    def pixels(self, reply):
        """uint8 [N, H, W, C] of a GenerateResponse with PNG images."""
        out = []
        for image in reply.images:
            width, height, mode, data = decode_png(image.data)
            self.assertEqual(mode, "L")
            out.append(torch.frombuffer(bytearray(data), dtype=torch.uint8)
                       .reshape(height, width, 1))
        return torch.stack(out)

    def reference(self, prompt, seeds, width, height):
        ids = list(self.dmdserve.stub.Tokenize(pb.TokenizeRequest(text=prompt),
                                               timeout=10).input_ids)
        items = [{"input_ids": ids, "seed": s} for s in seeds]
        return reference_pipeline.sample(self.loaded, items, width, height, self.uncond)

    def assert_close(self, a, b):
        self.assertEqual(a.shape, b.shape)
        self.assertLessEqual((a.int() - b.int()).abs().max().item(), 1)

    def test_images_match_the_reference_and_dmdserve(self):
        for mode in self.peers:
            for prompt in PROMPTS:
                for width, height in [(32, 32), (64, 32)]:
                    with self.subTest(mode=mode, prompt=prompt, size=(width, height)):
                        request = pb.GenerateRequest(prompt=prompt, num_images=3, seed=SEED,
                                                     width=width, height=height)
                        reply = self.peer_stub(mode).Generate(request, timeout=60)
                        seeds = [SEED, SEED + 1, 0]
                        self.assertEqual([i.seed for i in reply.images], seeds)
                        self.assertEqual([i.index for i in reply.images], [0, 1, 2])
                        served = self.pixels(reply)
                        self.assert_close(served, self.reference(prompt, seeds, width, height))
                        theirs = self.pixels(self.dmdserve.stub.Generate(request, timeout=60))
                        self.assert_close(served, theirs)

    def test_concurrent_requests_batch_without_changing_images(self):
        stub = self.peer_stub("batched")
        requests = [pb.GenerateRequest(prompt=f"item {k}", seed=100 + k, num_images=1 + k % 2)
                    for k in range(8)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda r: stub.Generate(r, timeout=60), requests))
        for request, reply in zip(requests, replies):
            seeds = [request.seed + i for i in range(request.num_images)]
            self.assert_close(self.pixels(reply), self.reference(request.prompt, seeds, 32, 32))
        totals = self.peers["batched"].batch_totals()
        self.assertIsNotNone(totals)

    def test_models_tokenize_and_errors(self):
        stub = self.peer_stub("batched")
        models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        self.assertEqual([(m.name, m.width, m.height, m.channels, m.max_images_per_request)
                          for m in models], [("tiny-random", 32, 32, 1, 8)])
        for text in PROMPTS:
            ours = stub.Tokenize(pb.TokenizeRequest(text=text), timeout=10)
            theirs = self.dmdserve.stub.Tokenize(pb.TokenizeRequest(text=text), timeout=10)
            self.assertEqual(list(ours.input_ids), list(theirs.input_ids))
        for bad in [pb.GenerateRequest(prompt=""), pb.GenerateRequest(prompt="x", num_images=9),
                    pb.GenerateRequest(prompt="x", width=48, height=48)]:
            with self.assertRaises(grpc.RpcError) as e:
                stub.Generate(bad, timeout=10)
            self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)

    def test_dmdctl_bench_drives_both_modes(self):
        for mode, peer in self.peers.items():
            with self.subTest(mode=mode):
                self.assertEqual(run_dmdctl("health", target=peer.target).stdout.strip(),
                                 "SERVING")
                out = run_dmdctl("bench", "--concurrency=4", "--count=12", "--json",
                                 target=peer.target)
                self.assertEqual(out.returncode, 0, out.stderr)
                report = json.loads(out.stdout)
                self.assertEqual((report["ok"], report["images"]), (12, 12))


if __name__ == "__main__":
    unittest.main()
