"""dmdserve.Client against the real dmdserve binary serving the tiny bundle: the same images as
the raw gRPC stub, streams, models, tokenize, typed errors with the server's messages, API keys,
retries of real RESOURCE_EXHAUSTED answers, and TLS with client certificates."""
import logging
import socket
import tempfile
import unittest

import grpc

import dmdserve
from dmdserve import RetryPolicy
from harness import Server, SharedServerTestCase, decode_png, make_slow_bundle, pb, wait_until
from keys import key_calls, secret, write_keys_file

PROMPT = "a photo of a sneaker"
QUICK_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)


class ClientTest(SharedServerTestCase):
    # A fixed batch size (no warm-up measurement): a request's images ride in one batch, so the
    # raw stub and the client get bit-identical images for the same request.
    server_flags = ("--max_batch_size=8",)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.client = dmdserve.Client(cls.server.target)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        super().tearDownClass()

    def raw_generate(self, **fields):
        return self.server.stub.Generate(pb.GenerateRequest(**fields), timeout=60)

    def test_generate_returns_the_raw_stubs_images_and_seeds(self):
        result = self.client.generate(PROMPT, 3, seed=100, request_id="py-1")
        raw = self.raw_generate(prompt=PROMPT, num_images=3, seed=100)
        self.assertEqual([i.data for i in result], [i.data for i in raw.images])
        self.assertEqual(result.seeds, [100, 101, 102])
        self.assertEqual((result.model, result.request_id), ("tiny-random", "py-1"))
        self.assertGreater(result.timings.total_seconds, 0)
        self.assertGreater(result.timings.generator_seconds, 0)
        self.assertEqual(result.timings.batch_size, 3)
        for image, raw_image in zip(result, raw.images):
            self.assertEqual(image.png, raw_image.data)
            self.assertEqual(image.png[:8], b"\x89PNG\r\n\x1a\n")
            self.assertEqual((image.pil.mode, image.pil.size), ("L", (32, 32)))
            self.assertEqual(image.pil.tobytes(), decode_png(raw_image.data)[3])

    def test_raw_encoding_and_a_non_default_size(self):
        raw = self.client.generate(PROMPT, seed=9, size="64x32", encoding="raw")[0]
        png = self.client.generate(PROMPT, seed=9, size=(64, 32))[0]
        self.assertIs(raw.encoding, dmdserve.Encoding.RAW)
        self.assertEqual((raw.width, raw.height, raw.channels), (64, 32, 1))
        self.assertEqual(len(raw.data), 64 * 32)
        self.assertEqual(raw.pil.tobytes(), png.pil.tobytes())
        self.assertEqual(decode_png(raw.png)[3], decode_png(png.data)[3])

    def test_without_a_seed_the_server_draws_one(self):
        a, b = self.client.generate(PROMPT, 2), self.client.generate(PROMPT, 2)
        self.assertEqual(a.seeds[1], a.seeds[0] + 1)
        self.assertNotEqual(a.seeds, b.seeds)

    def test_stream_yields_every_image_as_the_unary_call_makes_it(self):
        images = list(self.client.stream("trainers", 4, seed=7, request_id="s-1"))
        self.assertEqual(sorted(i.index for i in images), [0, 1, 2, 3])
        unary = self.raw_generate(prompt="trainers", num_images=4, seed=7)
        for image in images:
            self.assertEqual(image.seed, 7 + image.index)
            self.assertEqual((image.model, image.request_id), ("tiny-random", "s-1"))
            self.assertGreater(image.timings.total_seconds, 0)
            self.assertEqual(image.pil.tobytes(), decode_png(unary.images[image.index].data)[3])

    def test_models_describe_what_list_models_does(self):
        models = self.client.models()
        raw = self.server.stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        self.assertEqual([m.name for m in models], [m.name for m in raw])
        m = models[0]
        self.assertEqual((m.name, m.is_default, m.ready), ("tiny-random", True, True))
        self.assertEqual((m.width, m.height, m.channels, m.steps, m.max_tokens),
                         (32, 32, 1, 1, 77))
        self.assertEqual(m.supported_sizes, [(32, 32), (64, 32)])
        self.assertEqual(m.max_images_per_request, raw[0].max_images_per_request)
        self.assertEqual([b.max_batch_size for b in m.batching], [8])
        self.assertEqual(m.description, raw[0].description)

    def test_tokenize_matches_the_raw_stub(self):
        prompt = " ".join(["sneaker"] * 100)
        tokens = self.client.tokenize(prompt)
        raw = self.server.stub.Tokenize(pb.TokenizeRequest(text=prompt), timeout=10)
        self.assertEqual((tokens.ids, tokens.tokens, tokens.input_ids),
                         (list(raw.ids), list(raw.tokens), list(raw.input_ids)))
        self.assertEqual((tokens.truncated_tokens, tokens.model), (25, "tiny-random"))
        self.assertEqual(self.client.generate(prompt, seed=1).truncated_tokens, 25)

    def test_bad_input_raises_invalid_argument_naming_the_field(self):
        cases = [({"prompt": ""}, "prompt is required"),
                 ({"prompt": PROMPT, "n": 1000}, "num_images is 1000"),
                 ({"prompt": PROMPT, "size": (5, 5)}, "width x height 5x5 is not supported"),
                 ({"prompt": PROMPT, "request_id": "tab\there"}, "request_id")]
        for kwargs, message in cases:
            with self.subTest(**kwargs):
                with self.assertRaises(dmdserve.InvalidArgumentError) as caught:
                    self.client.generate(**kwargs)
                self.assertIn(message, caught.exception.message)
                self.assertIsInstance(caught.exception, ValueError)
        stream = self.client.stream("")
        with self.assertRaisesRegex(dmdserve.InvalidArgumentError, "prompt is required"):
            next(stream)

    def test_unknown_model_is_not_found_listing_the_served_ones(self):
        for call in (lambda: self.client.generate(PROMPT, model="nope"),
                     lambda: list(self.client.stream(PROMPT, model="nope")),
                     lambda: self.client.tokenize("a", model="nope")):
            with self.assertRaises(dmdserve.NotFoundError) as caught:
                call()
            self.assertIn("'nope'", caught.exception.message)
            self.assertIn("tiny-random", caught.exception.message)

    def test_an_unreachable_server_is_unavailable_once_the_retries_are_spent(self):
        with socket.socket() as s:  # bound, never listening: connections are refused
            s.bind(("127.0.0.1", 0))
            with dmdserve.Client(f"127.0.0.1:{s.getsockname()[1]}", retry=QUICK_RETRY) as client:
                with self.assertLogs("dmdserve", logging.INFO) as logs:
                    with self.assertRaises(dmdserve.UnavailableError):
                        client.models(timeout=30)
        self.assertEqual(len(logs.records), 2)  # 3 attempts


class DeadlineTest(unittest.TestCase):
    """A deadline that passes while the server works: DeadlineExceededError (also a
    TimeoutError), raised on the first attempt (a deadline is never retried), and the server
    gives the request up too."""
    SLOW_MODEL = "tiny-random-50-steps"
    IMAGES = 64

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        # The teacher's 50-step schedule, 64 images one at a time: about 4 s of work a request
        # here (2.2 s for 32), well past the deadlines below.
        bundle = make_slow_bundle(cls.tmp.name, cls.SLOW_MODEL,
                                  max_images_per_request=cls.IMAGES)
        cls.server = Server("--max_batch_size=1", "--workers=1", model_dirs=(bundle,))

    @classmethod
    def tearDownClass(cls):
        code = cls.server.stop()
        cls.tmp.cleanup()
        assert code == 0, cls.server.log()

    def expired_on_the_server(self):
        """Whether the server gave up a request of the slow model: at its deadline, or as
        cancelled when gRPC told it first that the call was over."""
        return wait_until(lambda: any(
            f"model={self.SLOW_MODEL}" in line
            and ("code=DEADLINE_EXCEEDED" in line or "code=CANCELLED" in line)
            for line in self.server.lines))

    def test_generate_past_its_deadline(self):
        with dmdserve.Client(self.server.target) as client:
            client.models()  # connected: the deadline below is the request's alone
            with self.assertNoLogs("dmdserve", logging.INFO):  # no retry
                with self.assertRaises(dmdserve.DeadlineExceededError) as caught:
                    client.generate(PROMPT, self.IMAGES, model=self.SLOW_MODEL, timeout=1.0)
        self.assertIsInstance(caught.exception, TimeoutError)
        self.assertEqual(caught.exception.code, grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertTrue(self.expired_on_the_server(), self.server.log())

    def test_stream_past_its_deadline(self):
        seeds = []
        with dmdserve.Client(self.server.target) as client:
            client.models()
            with self.assertNoLogs("dmdserve", logging.INFO):
                with self.assertRaises(dmdserve.DeadlineExceededError):
                    for image in client.stream(PROMPT, self.IMAGES, model=self.SLOW_MODEL, seed=1,
                                               timeout=1.5):
                        seeds.append(image.seed)
        # Whatever arrived before the deadline are images of this request, each once.
        self.assertLess(len(seeds), self.IMAGES)
        self.assertEqual(len(set(seeds)), len(seeds))
        self.assertLessEqual(set(seeds), set(range(1, self.IMAGES + 1)))


class ApiKeyTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.server = Server(f"--api_keys_file={write_keys_file(cls.tmp.name)}",
                            "--max_batch_size=8")

    @classmethod
    def tearDownClass(cls):
        code = cls.server.stop()
        cls.tmp.cleanup()
        assert code == 0, cls.server.log()

    def test_a_key_is_required_and_a_known_one_accepted(self):
        for api_key, message in ((None, "missing API key"), ("not-a-key", "unknown API key")):
            with dmdserve.Client(self.server.target, api_key=api_key) as client:
                for call in (client.models, lambda: client.tokenize("a"),
                             lambda: client.generate(PROMPT), lambda: list(client.stream(PROMPT))):
                    with self.assertRaises(dmdserve.UnauthenticatedError) as caught:
                        call()
                    self.assertIn(message, caught.exception.message)
        with dmdserve.Client(self.server.target, api_key=secret("alice")) as client:
            self.assertEqual([m.name for m in client.models()], ["tiny-random"])
            self.assertEqual(client.tokenize("a red fox").ids, [320, 736, 3240])
            self.assertEqual(client.generate(PROMPT, 2, seed=3).seeds, [3, 4])
            self.assertEqual(len(list(client.stream(PROMPT, 2, seed=3))), 2)

    def test_refusals_are_retried_then_raised_with_the_servers_message(self):
        with dmdserve.Client(self.server.target, api_key=secret("bob"),
                             retry=QUICK_RETRY) as client:
            self.assertEqual(len(client.generate(PROMPT, 2, seed=1)), 2)  # bob's whole burst
            # Refilling 2 images takes bob 2 s; three quick attempts are all refused.
            with self.assertLogs("dmdserve", logging.INFO) as logs:
                with self.assertRaises(dmdserve.ResourceExhaustedError) as caught:
                    client.generate(PROMPT, 2, seed=1)
            # More than the burst can never be admitted: refused once, not retried.
            with self.assertNoLogs("dmdserve", logging.INFO):
                with self.assertRaises(dmdserve.InvalidArgumentError) as never:
                    client.generate(PROMPT, 4, seed=1)
        self.assertIn("API key 'bob' is limited to 1 images per second", caught.exception.message)
        self.assertEqual(len(logs.records), 2)
        self.assertEqual(key_calls(self.server, "bob", "RESOURCE_EXHAUSTED", at_least=3), 3)
        self.assertIn("num_images is 4; the limit for API key 'bob' is 2", never.exception.message)

    def test_a_refused_request_succeeds_once_the_key_has_refilled(self):
        patient = RetryPolicy(max_attempts=100, initial_backoff_s=0.05, max_backoff_s=0.5)
        with dmdserve.Client(self.server.target, api_key=secret("carol"),
                             retry=patient) as client:
            self.assertEqual(len(client.generate(PROMPT, 4, seed=1)), 4)  # the whole burst
            with self.assertLogs("dmdserve", logging.INFO) as logs:
                logging.getLogger("dmdserve").info("start")  # assertLogs needs one record
                result = client.generate(PROMPT, 4, seed=5, timeout=120)
        self.assertEqual(result.seeds, [5, 6, 7, 8])
        retries = len(logs.records) - 1
        self.assertEqual(key_calls(self.server, "carol", "OK", at_least=2), 2)
        self.assertEqual(key_calls(self.server, "carol", "RESOURCE_EXHAUSTED"), retries)


class TlsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        from test_tls import make_ca, make_cert  # tests/integration: openssl-made certificates
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.tmp.name
        for ca in ("server-ca", "client-ca"):
            make_ca(d, ca)
        make_cert(d, "server", "server-ca", san="DNS:localhost")  # no IP address in it
        make_cert(d, "client", "client-ca", san="DNS:client")
        cls.server = Server(f"--tls_cert_file={d}/server.pem", f"--tls_key_file={d}/server.key",
                            f"--tls_client_ca_file={d}/client-ca.pem")
        cls.target = f"localhost:{cls.server.port}"

    @classmethod
    def tearDownClass(cls):
        code = cls.server.stop()
        cls.tmp.cleanup()
        assert code == 0, cls.server.log()

    def tls(self, client=True, **kwargs):
        d = self.tmp.name
        files = {"cert_file": f"{d}/client.pem", "key_file": f"{d}/client.key"} if client else {}
        return dmdserve.TlsConfig(ca_file=f"{d}/server-ca.pem", **files, **kwargs)

    def test_mutual_tls(self):
        with dmdserve.Client(self.target, tls=self.tls()) as client:
            self.assertEqual([m.name for m in client.models()], ["tiny-random"])
            self.assertEqual(client.generate(PROMPT, seed=1).seeds, [1])

    def test_server_name_checks_the_certificate_against_another_name_than_the_targets(self):
        by_ip = f"127.0.0.1:{self.server.port}"  # not a name the certificate has
        with dmdserve.Client(by_ip, tls=self.tls(), retry=dmdserve.NO_RETRY) as client:
            with self.assertRaises(dmdserve.UnavailableError):
                client.models(timeout=20)
        with dmdserve.Client(by_ip, tls=self.tls(server_name="localhost")) as client:
            self.assertEqual([m.name for m in client.models()], ["tiny-random"])

    def test_no_client_certificate_or_no_tls_is_unavailable(self):
        for tls in (self.tls(client=False), None):
            with self.subTest(tls=tls):
                with dmdserve.Client(self.target, tls=tls, retry=dmdserve.NO_RETRY) as client:
                    with self.assertRaises(dmdserve.UnavailableError):
                        client.models(timeout=20)

    def test_a_certificate_needs_its_key(self):
        with self.assertRaisesRegex(ValueError, "cert_file and key_file"):
            dmdserve.TlsConfig(cert_file=f"{self.tmp.name}/client.pem")


if __name__ == "__main__":
    unittest.main()
