"""The HTTP/JSON API (OpenAI-compatible POST /v1/images/generations, GET /v1/models) of the real
server: the same images as gRPC Generate, OpenAI's error shape and HTTP codes, API keys, the body
limit, drain, and a stalled client that does not hold up other requests."""
import base64
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import unittest
import urllib.error
import urllib.request

from harness import (SOURCE_DIR, TINY_BUNDLE, Server, make_slow_bundle, metric_value, pb,
                     wait_until, write_api_keys)

FASHION_BUNDLE = os.path.join(SOURCE_DIR, "models", "fashion-dmd")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def http(server, path, body=None, headers=None, method=None, timeout_s=120):
    """(status, headers, parsed JSON body) of one request to the server's HTTP API."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", data=data,
                                     headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def generate(server, body, headers=None):
    return http(server, "/v1/images/generations", body, headers)


class HttpApiTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Server("--http_model_aliases=gpt-image-1=tiny-random")

    @classmethod
    def tearDownClass(cls):
        assert cls.server.stop() == 0, cls.server.log()

    def assertError(self, response, http_status, param=None, code=None):
        status, _, body = response
        self.assertEqual(status, http_status, body)
        self.assertEqual(set(body["error"]), {"message", "type", "param", "code"}, body)
        self.assertTrue(body["error"]["message"])
        self.assertEqual(body["error"]["param"], param, body)
        if code is not None:
            self.assertEqual(body["error"]["code"], code, body)
        return body["error"]

    def test_generation_returns_the_grpc_images_and_seeds(self):
        status, headers, body = generate(self.server, {"prompt": "a boot", "n": 2, "seed": 11,
                                                       "size": "64x32", "user": "alice"})
        self.assertEqual(status, 200, body)
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertIsInstance(body["created"], int)
        self.assertEqual([d["seed"] for d in body["data"]], [11, 12])
        grpc_images = self.server.stub.Generate(
            pb.GenerateRequest(prompt="a boot", num_images=2, seed=11, width=64, height=32),
            timeout=120).images
        self.assertEqual([base64.b64decode(d["b64_json"]) for d in body["data"]],
                         [i.data for i in grpc_images])
        self.assertTrue(any("rpc=POST /v1/images/generations" in line and "user=alice" in line
                            and "http=200" in line for line in self.server.lines))
        text = self.server.metrics()
        self.assertGreaterEqual(metric_value(text, "dmdserve_requests_total", model="tiny-random",
                                             method="POST /v1/images/generations", code="OK"), 1)

    def test_alias_and_default_model_and_models_list(self):
        for model in ("gpt-image-1", "tiny-random", None):
            status, _, body = generate(self.server, {"prompt": "x", "model": model, "seed": 1})
            self.assertEqual(status, 200, body)
        status, _, body = http(self.server, "/v1/models")
        self.assertEqual(status, 200)
        self.assertEqual(body["object"], "list")
        self.assertEqual([(m["id"], m["object"], m["owned_by"]) for m in body["data"]],
                         [("tiny-random", "model", "dmdserve")])
        self.assertIsInstance(body["data"][0]["created"], int)

    def test_bad_requests_are_400_in_openai_shape(self):
        cases = [
            ({"n": 1}, "prompt"),
            ({"prompt": "x", "response_format": "url"}, "response_format"),
            ({"prompt": "x", "output_format": "webp"}, "output_format"),
            ({"prompt": "x", "size": "big"}, "size"),
            ({"prompt": "x", "n": 0}, "n"),
            (b"{not json", None),
        ]
        for body, param in cases:
            with self.subTest(body=body):
                self.assertError(generate(self.server, body), 400, param)
        # Validation's and the engine's errors name OpenAI's param: a size the model does not
        # serve, a prompt empty or over the limit, too many images.
        error = self.assertError(generate(self.server, {"prompt": "x", "size": "48x48"}), 400,
                                 "size")
        self.assertIn("48", error["message"])
        self.assertError(generate(self.server, {"prompt": "x" * 5000}), 400, "prompt")
        self.assertError(generate(self.server, {"prompt": ""}), 400, "prompt")
        self.assertError(generate(self.server, {"prompt": "x", "n": 1000}), 400, "n")
        self.assertError(generate(self.server, {"prompt": "x"},
                                  {"X-Request-Timeout": "soon"}), 400)

    def test_start_up_logs_no_libmicrohttpd_warning(self):
        self.assertEqual([line for line in self.server.lines if "libmicrohttpd" in line], [])

    def test_unknown_model_is_404_listing_the_served_ones(self):
        error = self.assertError(generate(self.server, {"prompt": "x", "model": "dall-e-3"}), 404,
                                 code="model_not_found")
        self.assertIn("tiny-random", error["message"])

    def test_deadline_that_passes_before_the_run_is_504(self):
        self.assertError(generate(self.server, {"prompt": "x"}, {"X-Request-Timeout": "0.000001"}),
                         504)

    def test_body_over_the_limit_is_413(self):
        self.assertError(generate(self.server, {"prompt": "x" * (70 << 10)}), 413,
                         code="request_too_large")

    def test_unknown_path_and_wrong_method(self):
        self.assertEqual(http(self.server, "/v1/nope")[0], 404)
        status, headers, _ = http(self.server, "/v1/images/generations", method="GET")
        self.assertEqual((status, headers["Allow"]), (405, "POST"))

    def test_curl_gets_two_pngs(self):
        out = subprocess.run(
            ["curl", "-s", f"localhost:{self.server.http_port}/v1/images/generations", "-d",
             '{"prompt":"a photo of a sneaker","n":2,"seed":7}'],
            capture_output=True, timeout=120, check=True)
        images = [base64.b64decode(d["b64_json"]) for d in json.loads(out.stdout)["data"]]
        self.assertEqual(len(images), 2)
        self.assertTrue(all(i.startswith(PNG_MAGIC) for i in images))

    def test_stalled_client_does_not_delay_other_requests(self):
        with socket.create_connection(("127.0.0.1", self.server.http_port)) as stalled:
            # Half a request: headers promise a body that never comes.
            stalled.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Length: 100\r\n\r\n{\"prompt\":")
            status, _, body = generate(self.server, {"prompt": "x", "seed": 3})
            self.assertEqual(status, 200, body)
            self.assertEqual(http(self.server, "/v1/models")[0], 200)
            # The stalled connection is still open (not served first, then closed): the other
            # requests did not wait for it.
            stalled.setblocking(False)
            with self.assertRaises(BlockingIOError):
                stalled.recv(1, socket.MSG_PEEK)


class DoneWhenTest(unittest.TestCase):
    """curl against fashion-dmd (the default model) returns the PNGs gRPC Generate returns."""

    def test_curl_matches_grpc_byte_for_byte(self):
        with Server(model_dirs=(FASHION_BUNDLE,)) as server:
            out = subprocess.run(
                ["curl", "-s", f"localhost:{server.http_port}/v1/images/generations", "-d",
                 '{"prompt":"a photo of a sneaker","n":2,"seed":7}'],
                capture_output=True, timeout=300, check=True)
            body = json.loads(out.stdout)
            grpc_images = server.stub.Generate(
                pb.GenerateRequest(prompt="a photo of a sneaker", num_images=2, seed=7),
                timeout=300).images
            self.assertEqual([d["seed"] for d in body["data"]], [7, 8])
            self.assertEqual([base64.b64decode(d["b64_json"]) for d in body["data"]],
                             [i.data for i in grpc_images])
            self.assertTrue(all(i.data.startswith(PNG_MAGIC) for i in grpc_images))
            self.assertEqual(server.stop(), 0, server.log())


class HttpApiKeysTest(unittest.TestCase):
    SECRET = "s3cret-http"

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        # 1 image/s: a 2-image burst
        keys_file = write_api_keys(cls.tmp.name, {"alice": (cls.SECRET, 1)})
        cls.server = Server(f"--api_keys_file={keys_file}")

    @classmethod
    def tearDownClass(cls):
        assert cls.server.stop() == 0, cls.server.log()
        cls.tmp.cleanup()

    def test_missing_or_wrong_key_is_401_and_a_good_one_passes(self):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": self.SECRET}):
            with self.subTest(headers=headers):
                status, _, body = generate(self.server, {"prompt": "x"}, headers)
                self.assertEqual(status, 401, body)
                self.assertEqual(http(self.server, "/v1/models", headers=headers)[0], 401)
        auth = {"Authorization": f"Bearer {self.SECRET}"}
        self.assertEqual(http(self.server, "/v1/models", headers=auth)[0], 200)
        status, _, body = generate(self.server, {"prompt": "x"}, auth)
        self.assertEqual(status, 200, body)

    def test_over_the_rate_limit_is_429_with_retry_after(self):
        auth = {"Authorization": f"Bearer {self.SECRET}"}
        # Each 2-image request takes the whole burst, which refills in 2 s.
        answers = [generate(self.server, {"prompt": "x", "n": 2}, auth) for _ in range(3)]
        refused = [(headers, body) for status, headers, body in answers if status == 429]
        self.assertTrue(refused, [status for status, _, _ in answers])
        headers, body = refused[0]
        self.assertEqual(body["error"]["code"], "rate_limit_exceeded")
        self.assertEqual(headers["Retry-After"], "1")

    def test_more_than_the_burst_is_400_naming_n(self):
        auth = {"Authorization": f"Bearer {self.SECRET}"}
        status, headers, body = generate(self.server, {"prompt": "x", "n": 3}, auth)
        self.assertEqual(status, 400, body)
        self.assertEqual(body["error"]["param"], "n")
        self.assertIn("the limit for API key 'alice' is 2", body["error"]["message"])
        self.assertNotIn("Retry-After", headers)


class HttpDrainTest(unittest.TestCase):
    SLOW_MODEL = "tiny-random-50-steps"
    IMAGES = 32

    def setUp(self):
        # tiny-random with the teacher's 50-step guided schedule, and requests of 32 images one at
        # a time, so that a request takes seconds: SIGTERM and the test's next steps land while
        # it is in flight, however loaded the machine.
        self.tmp = tempfile.TemporaryDirectory()
        self.bundle = make_slow_bundle(self.tmp.name, self.SLOW_MODEL,
                                       max_images_per_request=self.IMAGES)

    def tearDown(self):
        self.tmp.cleanup()

    def start_slow_request(self, server):
        """A request of IMAGES images to the slow model on its own thread, once it is in flight:
        (the list its (status, headers, body) goes into, the thread)."""
        results = []
        worker = threading.Thread(target=lambda: results.append(
            generate(server, {"prompt": "a sandal", "n": self.IMAGES, "seed": 1})))
        worker.start()
        self.assertTrue(wait_until(lambda: (metric_value(
            server.metrics(), "dmdserve_requests_in_flight", model=self.SLOW_MODEL) or 0) > 0))
        return results, worker

    def test_drain_refuses_new_requests_with_503_and_finishes_accepted_ones(self):
        server = Server("--max_batch_size=1", "--workers=1", model_dirs=(self.bundle,))
        try:
            results, worker = self.start_slow_request(server)
            server.terminate()
            self.assertTrue(wait_until(lambda: any("draining" in l for l in server.lines)))
            status, headers, body = generate(server, {"prompt": "x"})
            self.assertEqual(status, 503, body)
            self.assertEqual(headers["Connection"], "close")
            worker.join(120)
            self.assertEqual(results[0][0], 200, results)
            self.assertEqual(len(results[0][2]["data"]), self.IMAGES)
            self.assertEqual(server.stop(), 0, server.log())
        except BaseException:
            server.stop(signal.SIGKILL)
            raise

    def test_after_the_grace_an_unfinished_request_gets_503_saying_so(self):
        # No grace: SIGTERM cancels the images still queued (gRPC: CANCELLED).
        server = Server("--max_batch_size=1", "--workers=1", "--drain_grace_s=0",
                        model_dirs=(self.bundle,))
        try:
            results, worker = self.start_slow_request(server)
            server.terminate()
            worker.join(120)
            status, _, body = results[0]
            self.assertEqual(status, 503, body)
            self.assertEqual(body["error"]["type"], "server_error")
            self.assertIn("grace", body["error"]["message"])
            self.assertEqual(server.stop(), 0, server.log())
            self.assertTrue(any("rpc=POST /v1/images/generations" in line
                                and "code=CANCELLED" in line for line in server.lines))
        except BaseException:
            server.stop(signal.SIGKILL)
            raise


class HttpFailureTwinsTest(unittest.TestCase):
    """The status table's server-side failures over HTTP: a model that fails its batch (500, as
    gRPC's INTERNAL) and a full queue (429, as RESOURCE_EXHAUSTED)."""

    def test_model_failure_is_500_without_internals_and_the_server_keeps_serving(self):
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(TINY_BUNDLE, "tokenizer", "vocab.json")) as f:
                trigger = json.load(f)["boom</w>"]
            bundle = os.path.join(tmp, "faulty")
            subprocess.run([sys.executable, os.path.join(SOURCE_DIR, "tests", "fixtures",
                                                         "make_faulty_bundle.py"),
                            "--src", TINY_BUNDLE, "--out", bundle, "--trigger-id", str(trigger)],
                           check=True)
            with Server(model_dirs=(bundle,)) as server:
                status, _, body = generate(server, {"prompt": "boom", "n": 2})
                self.assertEqual(status, 500, body)
                self.assertEqual(body["error"]["type"], "server_error")
                self.assertNotIn("/", body["error"]["message"])  # no paths or internals
                status, _, body = generate(server, {"prompt": "a bag"})
                self.assertEqual(status, 200, body)

    def test_full_queue_is_429_with_retry_after_and_accepted_requests_finish(self):
        with Server("--max_queue_images=8", "--max_batch_size=1", "--workers=1") as server:
            def one(i):
                return generate(server, {"prompt": f"a coat {i}", "n": 4, "seed": i})

            with concurrent.futures.ThreadPoolExecutor(32) as pool:
                results = list(pool.map(one, range(64)))
            ok = [r for r in results if r[0] == 200]
            full = [r for r in results if r[0] == 429]
            self.assertEqual(len(ok) + len(full), len(results), [r[0] for r in results])
            self.assertGreater(len(ok), 0)
            self.assertGreater(len(full), 0)
            self.assertTrue(all(len(r[2]["data"]) == 4 for r in ok))
            for _, headers, body in full:
                self.assertEqual(headers["Retry-After"], "1")
                self.assertEqual(body["error"]["code"], "rate_limit_exceeded")
                self.assertIn("queue", body["error"]["message"])


class HttpWarmupTest(unittest.TestCase):
    def test_503_while_warming_up_then_200(self):
        # Many warm-up passes keep the server in warm-up long enough to observe it.
        with Server("--warmup_runs=300", wait_ready=False) as server:
            server.wait_listening()
            status, _, body = generate(server, {"prompt": "x"})
            self.assertEqual(status, 503, body)
            self.assertIn("not ready", body["error"]["message"])
            self.assertEqual(body["error"]["type"], "server_error")
            status, _, body = http(server, "/v1/models")  # listed while warming up
            self.assertEqual((status, [m["id"] for m in body["data"]]), (200, ["tiny-random"]))
            server.wait_ready()
            status, _, body = generate(server, {"prompt": "x"})
            self.assertEqual(status, 200, body)


if __name__ == "__main__":
    unittest.main()
