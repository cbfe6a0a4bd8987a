"""The native API as JSON on the HTTP port (POST /v1/generate, /v1/generate:stream,
/v1/models:list, /v1/tokenize) of the real server: every answer parses as the gRPC API's message
(protobuf's JSON mapping) and says what gRPC says, images byte for byte; the stream sends each
image as it is ready and reports a late failure in a last line; errors carry the HTTP status, the
field and the gRPC status name; API keys, metrics and drain apply as on the other routes."""
import http.client
import json
import signal
import tempfile
import unittest

from google.protobuf import json_format

from harness import Server, make_slow_bundle, metric_value, pb, wait_until, write_api_keys

SLOW_MODEL = "tiny-random-50-steps"
SLOW_IMAGES = 32  # a stream of these has most of its images to go when its first line arrives


def request(server, method, path, body=None, headers=None, timeout_s=120):
    """(status, headers, body bytes) of one request to the server's HTTP API."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=timeout_s)
    try:
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def post(server, path, body=None, headers=None):
    """(status, headers, parsed JSON) of a POST."""
    status, response_headers, data = request(server, "POST", path, body, headers)
    return status, response_headers, json.loads(data)


def parse(message_type, data):
    """`data` (a JSON text or object) as a `message_type`; unknown fields fail the test."""
    text = data if isinstance(data, (str, bytes)) else json.dumps(data)
    return json_format.Parse(text, message_type())


def open_stream(server, body, headers=None):
    """An open POST /v1/generate:stream: (connection, response), the body not yet read."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=300)
    conn.request("POST", "/v1/generate:stream", body=json.dumps(body).encode(),
                 headers=headers or {})
    return conn, conn.getresponse()


def slow_bundle(tmp):
    """tiny-random with the teacher's 50-step guided schedule and SLOW_IMAGES images a request:
    run one image a batch, a stream of SLOW_IMAGES is still generating for seconds after its
    first line arrives."""
    return make_slow_bundle(tmp, SLOW_MODEL, max_images_per_request=SLOW_IMAGES)


class NativeJsonTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Server()

    @classmethod
    def tearDownClass(cls):
        assert cls.server.stop() == 0, cls.server.log()

    def assertError(self, response, http_status, status, param=None):
        code, headers, body = response
        self.assertEqual(code, http_status, body)
        self.assertEqual(headers["Content-Type"], "application/json")
        error = body["error"]
        self.assertEqual(set(error), {"message", "type", "param", "code", "status"}, body)
        self.assertEqual(error["status"], status, body)
        self.assertEqual(error["param"], param, body)
        self.assertTrue(error["message"])
        return error

    def test_generate_is_grpc_generate_as_json(self):
        body = {"prompt": "a boot", "numImages": 2, "seed": "11", "width": 64, "height": 32,
                "request_id": "native-1"}
        status, headers, json_body = post(self.server, "/v1/generate", body)
        self.assertEqual(status, 200, json_body)
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(headers["X-Content-Type-Options"], "nosniff")
        response = parse(pb.GenerateResponse, json_body)
        grpc_response = self.server.stub.Generate(
            pb.GenerateRequest(prompt="a boot", num_images=2, seed=11, width=64, height=32,
                               request_id="native-1"), timeout=120)
        self.assertEqual([i.data for i in response.images], [i.data for i in grpc_response.images])
        for field in ("index", "seed", "width", "height", "channels", "encoding"):
            self.assertEqual([getattr(i, field) for i in response.images],
                             [getattr(i, field) for i in grpc_response.images], field)
        self.assertEqual((response.request_id, response.model), ("native-1", "tiny-random"))
        self.assertEqual([i.seed for i in response.images], [11, 12])
        self.assertGreater(response.timings.total_seconds, 0)
        self.assertGreaterEqual(response.timings.batch_size, 1)
        # Protobuf's JSON mapping: every field present, uint64 as a string, lowerCamelCase.
        first = json_body["images"][0]
        self.assertEqual((first["index"], first["seed"], first["encoding"]),
                         (0, "11", "IMAGE_ENCODING_PNG"))
        self.assertIn("truncatedTokens", json_body)
        self.assertTrue(any("rpc=POST /v1/generate " in line and "request_id=native-1" in line
                            and "http=200" in line for line in self.server.lines))
        self.assertGreaterEqual(metric_value(self.server.metrics(), "dmdserve_requests_total",
                                             model="tiny-random", method="POST /v1/generate",
                                             code="OK"), 1)

    def test_request_id_header_is_used_when_the_body_has_none(self):
        status, _, body = post(self.server, "/v1/generate", {"prompt": "x", "seed": 1},
                               {"X-Request-Id": "from-header"})
        self.assertEqual(status, 200, body)
        self.assertEqual(body["requestId"], "from-header")

    def test_stream_sends_every_image_as_one_json_line(self):
        conn, response = open_stream(self.server, {"prompt": "a sandal", "num_images": 4,
                                                   "seed": 5, "requestId": "s-1"})
        try:
            self.assertEqual(response.status, 200)
            self.assertEqual(response.headers["Content-Type"], "application/x-ndjson")
            self.assertEqual(response.headers["Transfer-Encoding"], "chunked")
            lines = response.read().decode().splitlines()
        finally:
            conn.close()
        self.assertEqual(len(lines), 4, lines)
        images = sorted((parse(pb.GeneratedImage, line) for line in lines), key=lambda i: i.index)
        self.assertEqual([i.index for i in images], [0, 1, 2, 3])
        self.assertEqual([i.seed for i in images], [5, 6, 7, 8])
        self.assertTrue(all(i.request_id == "s-1" and i.model == "tiny-random" for i in images))
        grpc_images = sorted(self.server.stub.GenerateStream(
            pb.GenerateRequest(prompt="a sandal", num_images=4, seed=5), timeout=120),
            key=lambda i: i.index)
        self.assertEqual([i.data for i in images], [i.data for i in grpc_images])
        self.assertTrue(wait_until(lambda: metric_value(
            self.server.metrics(), "dmdserve_requests_total", model="tiny-random",
            method="POST /v1/generate:stream", code="OK") == 1))

    def test_list_models_and_tokenize_say_what_grpc_says(self):
        grpc_models = self.server.stub.ListModels(pb.ListModelsRequest(), timeout=30)
        for body in (None, b"", {}):
            with self.subTest(body=body):
                status, _, json_body = post(self.server, "/v1/models:list", body)
                self.assertEqual(status, 200, json_body)
                self.assertEqual(parse(pb.ListModelsResponse, json_body), grpc_models)
        text = "a photo of a cat " * 20  # over 77 tokens: truncated
        status, _, json_body = post(self.server, "/v1/tokenize", {"text": text})
        self.assertEqual(status, 200, json_body)
        tokens = parse(pb.TokenizeResponse, json_body)
        self.assertEqual(tokens,
                         self.server.stub.Tokenize(pb.TokenizeRequest(text=text), timeout=30))
        self.assertGreater(tokens.truncated_tokens, 0)
        text = self.server.metrics()
        # ListModels names no model (counted as "_unknown", as over gRPC).
        for method, model in (("POST /v1/models:list", "_unknown"),
                              ("POST /v1/tokenize", "tiny-random")):
            self.assertGreaterEqual(metric_value(text, "dmdserve_requests_total", method=method,
                                                 model=model, code="OK"), 1, method)

    def test_bad_fields_are_400_naming_the_field(self):
        cases = [
            ("/v1/generate", {"prompt": "x", "num_image": 2}, "num_image"),
            ("/v1/generate", {"prompt": "x", "numImages": "two"}, "num_images"),
            ("/v1/generate", {"prompt": "x", "seed": -1}, "seed"),
            ("/v1/generate", {"prompt": "x", "encoding": "JPEG"}, "encoding"),
            ("/v1/generate:stream", {"prompt": "x", "size": "64x64"}, "size"),
            ("/v1/tokenize", {"prompt": "x"}, "prompt"),
            ("/v1/models:list", {"verbose": True}, "verbose"),
            ("/v1/generate", b"[1, 2]", None),
            ("/v1/generate", b"{not json", None),
        ]
        for path, body, param in cases:
            with self.subTest(path=path, body=body):
                self.assertError(post(self.server, path, body), 400, "INVALID_ARGUMENT", param)
        # Validation (request_validation.h) and the engine: their messages, as over gRPC, and
        # the field they name first as `param`.
        for path, body, field in [
                ("/v1/generate", {"numImages": 1}, "prompt"),
                ("/v1/generate", {"prompt": "x", "numImages": 65}, "num_images"),
                ("/v1/generate", {"prompt": "x", "numImages": 9}, "num_images"),  # model's limit
                ("/v1/generate:stream", {"prompt": "x", "width": 64}, "width"),
                ("/v1/generate", {"prompt": "x", "width": 48, "height": 48}, "width"),
                ("/v1/tokenize", {"text": "x" * 5000}, "text")]:
            with self.subTest(body=body):
                error = self.assertError(post(self.server, path, body), 400, "INVALID_ARGUMENT",
                                         field)
                self.assertIn(field, error["message"])

    def test_failures_get_their_http_status_and_grpc_status_name(self):
        error = self.assertError(post(self.server, "/v1/generate",
                                      {"prompt": "x", "model": "dall-e-3"}), 404, "NOT_FOUND")
        self.assertEqual(error["code"], "model_not_found")
        self.assertIn("tiny-random", error["message"])
        self.assertError(post(self.server, "/v1/generate", {"prompt": "x"},
                              {"X-Request-Timeout": "0.000001"}), 504, "DEADLINE_EXCEEDED")
        error = self.assertError(post(self.server, "/v1/generate", {"prompt": "x" * (70 << 10)}),
                                 413, "OUT_OF_RANGE")
        self.assertEqual(error["code"], "request_too_large")
        # A stream that fails before its first image is an ordinary error response.
        self.assertError(post(self.server, "/v1/generate:stream",
                              {"prompt": "x", "model": "dall-e-3"}), 404, "NOT_FOUND")
        self.assertError(post(self.server, "/v1/generate:stream", {"prompt": "x"},
                              {"X-Request-Timeout": "0.000001"}), 504, "DEADLINE_EXCEEDED")
        self.assertGreaterEqual(metric_value(self.server.metrics(), "dmdserve_requests_total",
                                             model="_unknown", method="POST /v1/generate",
                                             code="NOT_FOUND"), 1)

    def test_wrong_method_is_405_and_openai_routes_are_unchanged(self):
        for path in ("/v1/generate", "/v1/generate:stream", "/v1/models:list", "/v1/tokenize"):
            with self.subTest(path=path):
                status, headers, _ = request(self.server, "GET", path)
                self.assertEqual((status, headers["Allow"]), (405, "POST"))
        status, _, body = request(self.server, "GET", "/v1/models")
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["object"], "list")
        status, _, body = post(self.server, "/v1/images/generations", {"prompt": "x", "bad": 1})
        self.assertEqual(status, 200, body)  # OpenAI's route still ignores unknown fields
        status, _, body = post(self.server, "/v1/images/generations", {"prompt": "x", "n": 0})
        self.assertEqual(set(body["error"]), {"message", "type", "param", "code"})


class NativeStreamLifecycleTest(unittest.TestCase):
    """The stream against a model slow enough that its images are still generating when the
    first line arrives (one image per batch)."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.bundle = slow_bundle(self.tmp.name)

    def tearDown(self):
        self.tmp.cleanup()

    def start(self, *flags):
        return Server("--max_batch_size=1", "--workers=1", *flags, model_dirs=(self.bundle,))

    def in_flight(self, server):
        return metric_value(server.metrics(), "dmdserve_requests_in_flight",
                            model=SLOW_MODEL) or 0

    def test_first_image_arrives_while_the_rest_is_generating(self):
        server = self.start()
        try:
            conn, response = open_stream(server, {"prompt": "a bag", "numImages": SLOW_IMAGES,
                                                 "seed": 1})
            self.assertEqual(response.status, 200)
            first = parse(pb.GeneratedImage, response.readline())
            self.assertEqual(first.model, SLOW_MODEL)
            # The other images are still to come: the request is in flight.
            self.assertGreater(self.in_flight(server), 0)
            rest = response.read().decode().splitlines()
            conn.close()
            self.assertEqual(len(rest), SLOW_IMAGES - 1)
            indices = {first.index} | {parse(pb.GeneratedImage, line).index for line in rest}
            self.assertEqual(indices, set(range(SLOW_IMAGES)))
            self.assertEqual(server.stop(), 0, server.log())
        except BaseException:
            server.stop(signal.SIGKILL)
            raise

    def test_failure_after_the_first_image_ends_the_stream_with_an_error_line(self):
        # No drain grace: SIGTERM cancels every image still queued.
        server = self.start("--drain_grace_s=0")
        try:
            conn, response = open_stream(server, {"prompt": "a bag", "numImages": SLOW_IMAGES,
                                                 "seed": 1})
            self.assertEqual(response.status, 200)
            parse(pb.GeneratedImage, response.readline())
            server.terminate()
            lines = response.read().decode().splitlines()  # the body ends normally
            conn.close()
            self.assertGreaterEqual(len(lines), 1)
            *images, last = lines
            self.assertLess(len(images), SLOW_IMAGES - 1, lines)
            for line in images:
                parse(pb.GeneratedImage, line)
            error = json.loads(last)["error"]
            self.assertEqual(error["status"], "CANCELLED", last)
            self.assertIn("grace", error["message"])
            self.assertEqual(server.stop(), 0, server.log())
            self.assertTrue(any("rpc=POST /v1/generate:stream" in line and "code=CANCELLED" in line
                                and "http=200" in line for line in server.lines), server.log())
        except BaseException:
            server.stop(signal.SIGKILL)
            raise

    def test_client_that_goes_away_cancels_the_rest(self):
        server = self.start()
        try:
            batches = lambda: metric_value(server.metrics(), "dmdserve_batches_total",
                                           model=SLOW_MODEL, result="ok") or 0
            before = batches()
            conn, response = open_stream(server, {"prompt": "a bag", "numImages": SLOW_IMAGES,
                                                 "seed": 1})
            parse(pb.GeneratedImage, response.readline())
            conn.close()
            # The server notices at one of its next writes, and drops the images still queued.
            self.assertTrue(wait_until(lambda: any(
                "rpc=POST /v1/generate:stream" in line and "code=CANCELLED" in line
                for line in server.lines), timeout_s=120), server.log())
            self.assertTrue(wait_until(lambda: self.in_flight(server) == 0, timeout_s=120))
            # One image a batch: most never ran.
            self.assertLess(batches() - before, SLOW_IMAGES)
            self.assertEqual(server.stop(), 0, server.log())
        except BaseException:
            server.stop(signal.SIGKILL)
            raise


class NativeApiKeysTest(unittest.TestCase):
    SECRET = "s3cret-native"

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        keys_file = write_api_keys(cls.tmp.name, {"bob": (cls.SECRET, None)})
        cls.server = Server(f"--api_keys_file={keys_file}")

    @classmethod
    def tearDownClass(cls):
        assert cls.server.stop() == 0, cls.server.log()
        cls.tmp.cleanup()

    def test_every_native_route_needs_a_key(self):
        bodies = {"/v1/generate": {"prompt": "x"}, "/v1/generate:stream": {"prompt": "x"},
                  "/v1/models:list": {}, "/v1/tokenize": {"text": "x"}}
        good = {"Authorization": f"Bearer {self.SECRET}"}
        for path, body in bodies.items():
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                with self.subTest(path=path, headers=headers):
                    status, _, json_body = post(self.server, path, body, headers)
                    self.assertEqual(status, 401, json_body)
                    self.assertEqual(json_body["error"]["status"], "UNAUTHENTICATED")
            with self.subTest(path=path, key="good"):
                status, _, data = request(self.server, "POST", path, json.dumps(body).encode(),
                                          good)
                self.assertEqual(status, 200, data)
        self.assertGreaterEqual(metric_value(self.server.metrics(),
                                             "dmdserve_api_key_requests_total", key="bob",
                                             code="OK"), 4)

    def test_playground_files_need_no_key(self):
        for path in ("/", "/playground/app.js", "/playground/style.css"):
            with self.subTest(path=path):
                status, headers, body = request(self.server, "GET", path)
                self.assertEqual(status, 200)
                self.assertTrue(body)
                self.assertIn("default-src 'none'", headers["Content-Security-Policy"])
                self.assertEqual(headers["X-Content-Type-Options"], "nosniff")


if __name__ == "__main__":
    unittest.main()
