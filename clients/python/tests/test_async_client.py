"""dmdserve.AsyncClient against the real dmdserve binary (tiny bundle, API keys on): the main
paths of test_client.py through grpc.aio: images equal to the raw stub's, streams, models,
tokenize, typed errors, keys, retried refusals, and concurrent calls on one client."""
import asyncio
import logging
import tempfile
import unittest

import dmdserve
from dmdserve import RetryPolicy
from harness import Server, decode_png, pb
from keys import key_calls, secret, write_keys_file

PROMPT = "a photo of a sneaker"


class AsyncClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.server = Server(f"--api_keys_file={write_keys_file(cls.tmp.name)}",
                            "--max_batch_size=8")
        cls.alice = (("authorization", f"Bearer {secret('alice')}"),)

    @classmethod
    def tearDownClass(cls):
        code = cls.server.stop()
        cls.tmp.cleanup()
        assert code == 0, cls.server.log()

    def run_client(self, body, api_key=secret("alice"), **kwargs):
        """Runs `body(client)` in a fresh event loop with an AsyncClient made inside it."""
        async def main():
            async with dmdserve.AsyncClient(self.server.target, api_key=api_key,
                                            **kwargs) as client:
                return await body(client)
        return asyncio.run(main())

    def test_generate_returns_the_raw_stubs_images(self):
        result = self.run_client(lambda c: c.generate(PROMPT, 3, seed=100, request_id="a-1"))
        raw = self.server.stub.Generate(pb.GenerateRequest(prompt=PROMPT, num_images=3, seed=100),
                                        timeout=60, metadata=self.alice)
        self.assertEqual([i.data for i in result], [i.data for i in raw.images])
        self.assertEqual(result.seeds, [100, 101, 102])
        self.assertEqual((result.model, result.request_id), ("tiny-random", "a-1"))
        self.assertGreater(result.timings.total_seconds, 0)
        self.assertEqual(result[0].pil.tobytes(), decode_png(raw.images[0].data)[3])

    def test_stream_yields_every_image(self):
        async def body(client):
            return [image async for image in client.stream("trainers", 4, seed=7)]

        images = self.run_client(body)
        self.assertEqual(sorted(i.index for i in images), [0, 1, 2, 3])
        for image in images:
            self.assertEqual(image.seed, 7 + image.index)
            self.assertGreater(image.timings.total_seconds, 0)
            self.assertEqual(image.pil.size, (32, 32))

    def test_models_and_tokenize(self):
        async def body(client):
            return await client.models(), await client.tokenize("a red fox")

        models, tokens = self.run_client(body)
        self.assertEqual([(m.name, m.is_default, m.ready) for m in models],
                         [("tiny-random", True, True)])
        self.assertEqual((tokens.ids, tokens.tokens), ([320, 736, 3240],
                                                       ["a</w>", "red</w>", "fox</w>"]))

    def test_concurrent_calls_share_one_client(self):
        async def body(client):
            return await asyncio.gather(*(client.generate(PROMPT, 2, seed=10 * k)
                                          for k in range(6)))

        results = self.run_client(body)
        self.assertEqual([r.seeds for r in results], [[10 * k, 10 * k + 1] for k in range(6)])

    def test_typed_errors_with_the_servers_messages(self):
        async def body(client):
            caught = []
            for call in (lambda: client.generate(""), lambda: client.tokenize("a", model="nope")):
                try:
                    await call()
                except dmdserve.DmdserveError as e:
                    caught.append(e)
            try:
                async for _ in client.stream(PROMPT, model="nope"):
                    pass
            except dmdserve.DmdserveError as e:
                caught.append(e)
            return caught

        bad_prompt, unknown, unknown_stream = self.run_client(body)
        self.assertIsInstance(bad_prompt, dmdserve.InvalidArgumentError)
        self.assertEqual(bad_prompt.message, "prompt is required")
        for error in (unknown, unknown_stream):
            self.assertIsInstance(error, dmdserve.NotFoundError)
            self.assertIn("tiny-random", error.message)

    def test_a_key_is_required(self):
        async def body(client):
            await client.models()

        for api_key in (None, "not-a-key"):
            with self.assertRaises(dmdserve.UnauthenticatedError):
                self.run_client(body, api_key=api_key)

    def test_refusals_are_retried_then_raised(self):
        quick = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.02)
        async def body(client):
            await client.generate(PROMPT, 2)  # bob's whole burst, which refills in 2 s
            await client.generate(PROMPT, 2)  # so four quick attempts are all refused

        with self.assertLogs("dmdserve", logging.INFO) as logs:
            with self.assertRaises(dmdserve.ResourceExhaustedError) as caught:
                self.run_client(body, api_key=secret("bob"), retry=quick)
        self.assertIn("API key 'bob' is limited", caught.exception.message)
        self.assertEqual(len(logs.records), 3)
        self.assertEqual(key_calls(self.server, "bob", "RESOURCE_EXHAUSTED", at_least=4), 4)


if __name__ == "__main__":
    unittest.main()
