"""Generate, GenerateStream, ListModels and Tokenize through an independent Python gRPC client
against the real server and the real tiny TorchScript bundle."""
import concurrent.futures
import json
import os
import unittest

import grpc

from harness import SOURCE_DIR, SharedServerTestCase, decode_png, metric_value, pb

VECTORS = os.path.join(SOURCE_DIR, "worker", "testdata", "clip_tokenizer_reference_vectors.jsonl")


class GenerateTest(SharedServerTestCase):
    # A long batching window and a fixed batch size, so that concurrent probes really share
    # batches whatever the warm-up measurement would choose.
    server_flags = ("--max_queue_delay_us=20000", "--max_batch_size=8")

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = cls.server.stub.ListModels(pb.ListModelsRequest(), timeout=10).models[0]

    def generate(self, **fields):
        fields.setdefault("prompt", "a photo of a sneaker")
        return self.server.stub.Generate(pb.GenerateRequest(**fields), timeout=60)

    def test_list_models_describes_the_default_model(self):
        m = self.model
        self.assertEqual(m.name, "tiny-random")
        self.assertTrue(m.is_default)
        self.assertTrue(m.ready)
        self.assertEqual((m.width, m.height, m.channels), (32, 32, 1))
        self.assertEqual(m.steps, 1)
        self.assertEqual(m.max_tokens, 77)
        self.assertGreaterEqual(m.max_images_per_request, 4)
        self.assertEqual((m.supported_sizes[0].width, m.supported_sizes[0].height), (32, 32))

    def test_unary_returns_valid_pngs_with_consecutive_seeds(self):
        r = self.generate(num_images=3, seed=100, request_id="req-1")
        self.assertEqual(r.request_id, "req-1")
        self.assertEqual(r.model, "tiny-random")
        self.assertEqual([i.index for i in r.images], [0, 1, 2])
        self.assertEqual([i.seed for i in r.images], [100, 101, 102])
        for image in r.images:
            self.assertEqual(image.encoding, pb.IMAGE_ENCODING_PNG)
            self.assertEqual(image.data[:8], b"\x89PNG\r\n\x1a\n")
            w, h, mode, _ = decode_png(image.data)
            self.assertEqual((w, h, mode), (32, 32, "L"))
            self.assertEqual((image.width, image.height, image.channels), (32, 32, 1))
        self.assertGreater(r.timings.total_seconds, 0)
        self.assertGreaterEqual(r.timings.batch_size, 1)
        self.assertGreater(r.timings.generator_seconds, 0)
        self.assertEqual(r.truncated_tokens, 0)

    def test_any_image_can_be_regenerated_alone_from_its_seed(self):
        three = self.generate(num_images=3, seed=500)
        alone = self.generate(num_images=1, seed=502)
        self.assertEqual(decode_png(three.images[2].data)[3], decode_png(alone.images[0].data)[3])
        self.assertNotEqual(decode_png(three.images[0].data)[3],
                            decode_png(three.images[1].data)[3])

    def test_absent_seed_is_drawn_and_returned(self):
        a = self.generate(num_images=2)
        b = self.generate(num_images=2)
        self.assertEqual(a.images[1].seed, a.images[0].seed + 1)
        self.assertNotEqual(a.images[0].seed, b.images[0].seed)

    def test_raw_encoding_is_hwc_uint8_equal_to_the_png_pixels(self):
        png = self.generate(seed=9)
        raw = self.generate(seed=9, encoding=pb.IMAGE_ENCODING_RAW)
        image = raw.images[0]
        self.assertEqual(image.encoding, pb.IMAGE_ENCODING_RAW)
        self.assertEqual(len(image.data), 32 * 32 * 1)
        self.assertEqual(image.data, decode_png(png.images[0].data)[3])

    def test_explicit_default_size_is_accepted(self):
        r = self.generate(width=32, height=32, seed=1)
        self.assertEqual((r.images[0].width, r.images[0].height), (32, 32))

    def test_stream_sends_every_image_with_its_metadata(self):
        images = list(self.server.stub.GenerateStream(
            pb.GenerateRequest(prompt="trainers", num_images=4, seed=7, request_id="s-1"),
            timeout=60))
        self.assertEqual(sorted(i.index for i in images), [0, 1, 2, 3])
        unary = self.generate(prompt="trainers", num_images=4, seed=7)
        for image in images:
            self.assertEqual(image.seed, 7 + image.index)
            self.assertEqual(image.request_id, "s-1")
            self.assertEqual(image.model, "tiny-random")
            self.assertGreater(image.timings.total_seconds, 0)
            self.assertEqual(decode_png(image.data)[3],
                             decode_png(unary.images[image.index].data)[3])

    def test_long_prompt_reports_truncation(self):
        prompt = " ".join(["sneaker"] * 100)
        r = self.generate(prompt=prompt, seed=1)
        self.assertEqual(r.truncated_tokens, 100 - 75)
        t = self.server.stub.Tokenize(pb.TokenizeRequest(text=prompt), timeout=10)
        self.assertEqual(t.truncated_tokens, 25)
        self.assertEqual(len(t.ids), 100)
        self.assertEqual(len(t.input_ids), 77)

    def test_tokenize_reproduces_the_reference_vectors(self):
        with open(VECTORS) as f:
            records = [json.loads(line) for line in f if line.strip()]
        self.assertGreater(len(records), 0)
        for rec in records:
            t = self.server.stub.Tokenize(pb.TokenizeRequest(text=rec["text"]), timeout=10)
            self.assertEqual(list(t.ids), rec["ids"], rec["text"])
            self.assertEqual(list(t.input_ids), rec["input_ids_77"], rec["text"])
            self.assertEqual(len(t.tokens), len(t.ids))
            self.assertEqual(t.model, "tiny-random")
        t = self.server.stub.Tokenize(pb.TokenizeRequest(text="a photo of a cat"), timeout=10)
        self.assertEqual(list(t.tokens), ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"])

    def test_same_prompt_and_seed_give_the_same_image_under_concurrent_load(self):
        reference = decode_png(self.generate(prompt="an ankle boot", seed=4242).images[0].data)[3]

        def one(i):
            if i % 4 == 0:
                return ("probe", self.generate(prompt="an ankle boot", seed=4242))
            return ("noise", self.generate(prompt=f"a pullover {i}", seed=i, num_images=1 + i % 3))

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(48)))
        batch_sizes = set()
        for kind, r in results:
            if kind == "probe":
                batch_sizes.add(r.timings.batch_size)
                probe = decode_png(r.images[0].data)[3]
                diff = max(abs(a - b) for a, b in zip(probe, reference))
                self.assertLessEqual(diff, 1)
        # The probes really rode in batches with other requests.
        self.assertGreater(max(batch_sizes), 1)
        batches = metric_value(self.server.metrics(), "dmdserve_batch_size_images_count",
                               model="tiny-random")
        images = metric_value(self.server.metrics(), "dmdserve_batch_size_images_sum",
                              model="tiny-random")
        self.assertGreater(images / batches, 1.0)

    def test_list_models_reports_the_configured_batch_size_unmeasured(self):
        batching = self.model.batching
        self.assertEqual(len(batching), 1)
        self.assertEqual(batching[0].device, "cpu")
        self.assertEqual(batching[0].max_batch_size, 8)
        self.assertEqual(len(batching[0].measured), 0)


if __name__ == "__main__":
    unittest.main()
