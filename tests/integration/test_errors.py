"""Bad requests: each gets its gRPC status and a message naming the field; the server keeps
serving. Runs against the real server with the tiny bundle."""
import unittest

import grpc

from harness import SharedServerTestCase, metric_value, pb

OK_PROMPT = "a photo of a sneaker"

# (name, request fields, expected code, text the message must contain)
BAD_GENERATE = [
    ("missing prompt", dict(), grpc.StatusCode.INVALID_ARGUMENT, "prompt is required"),
    ("prompt too long", dict(prompt="a" * 4097), grpc.StatusCode.INVALID_ARGUMENT,
     "prompt is 4097 bytes; the limit is 4096"),
    ("negative num_images", dict(prompt=OK_PROMPT, num_images=-1),
     grpc.StatusCode.INVALID_ARGUMENT, "num_images"),
    ("num_images over the server limit", dict(prompt=OK_PROMPT, num_images=100000),
     grpc.StatusCode.INVALID_ARGUMENT, "num_images is 100000"),
    ("num_images over the model limit", dict(prompt=OK_PROMPT, num_images=9),
     grpc.StatusCode.INVALID_ARGUMENT, "num_images is 9; model 'tiny-random' allows 1..8"),
    ("unknown model", dict(prompt=OK_PROMPT, model="sdxl-turbo"), grpc.StatusCode.NOT_FOUND,
     "model 'sdxl-turbo' is not served; models: tiny-random"),
    ("model name too long", dict(prompt=OK_PROMPT, model="m" * 300),
     grpc.StatusCode.INVALID_ARGUMENT, "model is 300 bytes"),
    ("model name not printable", dict(prompt=OK_PROMPT, model="tiny\nforged log line"),
     grpc.StatusCode.INVALID_ARGUMENT, "model must be printable ASCII"),
    ("negative width", dict(prompt=OK_PROMPT, width=-32, height=32),
     grpc.StatusCode.INVALID_ARGUMENT, "width must be >= 0"),
    ("negative height", dict(prompt=OK_PROMPT, width=32, height=-32),
     grpc.StatusCode.INVALID_ARGUMENT, "height must be >= 0"),
    ("width without height", dict(prompt=OK_PROMPT, width=32), grpc.StatusCode.INVALID_ARGUMENT,
     "width and height must both be 0"),
    ("height without width", dict(prompt=OK_PROMPT, height=32),
     grpc.StatusCode.INVALID_ARGUMENT, "width and height must both be 0"),
    ("unsupported size", dict(prompt=OK_PROMPT, width=512, height=512),
     grpc.StatusCode.INVALID_ARGUMENT, "512x512 is not supported by model 'tiny-random'; "
     "supported: 32x32"),
    ("unknown encoding", dict(prompt=OK_PROMPT, encoding=7), grpc.StatusCode.INVALID_ARGUMENT,
     "encoding 7 is not a known ImageEncoding"),
    ("request_id too long", dict(prompt=OK_PROMPT, request_id="r" * 129),
     grpc.StatusCode.INVALID_ARGUMENT, "request_id is 129 bytes; the limit is 128"),
    ("request_id not printable", dict(prompt=OK_PROMPT, request_id="a\nb"),
     grpc.StatusCode.INVALID_ARGUMENT, "request_id must be printable ASCII"),
    ("request_id not ASCII", dict(prompt=OK_PROMPT, request_id="caf\u00e9"),
     grpc.StatusCode.INVALID_ARGUMENT, "request_id must be printable ASCII"),
]

BAD_TOKENIZE = [
    ("tokenize unknown model", dict(text="x", model="nope"), grpc.StatusCode.NOT_FOUND,
     "model 'nope' is not served"),
    ("tokenize text too long", dict(text="b" * 5000), grpc.StatusCode.INVALID_ARGUMENT,
     "text is 5000 bytes"),
]


class ErrorsTest(SharedServerTestCase):
    def check(self, rpc, cases):
        for name, fields, code, text in cases:
            with self.subTest(name):
                with self.assertRaises(grpc.RpcError) as ctx:
                    result = rpc(fields)
                    if not hasattr(result, "ByteSize"):  # a stream: read it to the end
                        list(result)
                self.assertEqual(ctx.exception.code(), code, ctx.exception.details())
                self.assertIn(text, ctx.exception.details())
            # After every bad request the server still serves a good one.
            ok = self.server.stub.Generate(pb.GenerateRequest(prompt=OK_PROMPT, seed=1),
                                           timeout=60)
            self.assertEqual(len(ok.images), 1)

    def test_bad_generate_requests(self):
        self.assertGreaterEqual(len(BAD_GENERATE) + len(BAD_TOKENIZE), 15)
        self.check(lambda f: self.server.stub.Generate(pb.GenerateRequest(**f), timeout=30),
                   BAD_GENERATE)

    def test_bad_stream_requests_fail_the_same_way(self):
        self.check(lambda f: self.server.stub.GenerateStream(pb.GenerateRequest(**f), timeout=30),
                   BAD_GENERATE)

    def test_bad_tokenize_requests(self):
        self.check(lambda f: self.server.stub.Tokenize(pb.TokenizeRequest(**f), timeout=30),
                   BAD_TOKENIZE)

    def test_errors_are_counted_by_code(self):
        with self.assertRaises(grpc.RpcError):
            self.server.stub.Generate(pb.GenerateRequest(prompt=OK_PROMPT, model="zzz"), timeout=30)
        text = self.server.metrics()
        self.assertGreaterEqual(metric_value(text, "dmdserve_requests_total", model="_unknown",
                                             method="Generate", code="NOT_FOUND"), 1)
        self.assertGreaterEqual(metric_value(text, "dmdserve_requests_total", model="tiny-random",
                                             method="Generate", code="INVALID_ARGUMENT"), 1)
        self.assertNotIn('model="zzz"', text)

    def test_client_deadline_too_short_is_deadline_exceeded(self):
        with self.assertRaises(grpc.RpcError) as ctx:
            self.server.stub.Generate(pb.GenerateRequest(prompt=OK_PROMPT, num_images=8),
                                      timeout=0.000001)
        self.assertEqual(ctx.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)


# Request bytes that are not a valid message (sent raw, past the client's own serialiser):
# (name, bytes, text the message must contain).
PROMPT_FIELD = pb.GenerateRequest.DESCRIPTOR.fields_by_name["prompt"].number
TEXT_FIELD = pb.TokenizeRequest.DESCRIPTOR.fields_by_name["text"].number
UNPARSEABLE = [
    ("random bytes", b"\xff\xff\xff\xff\x07", "not valid protobuf wire format"),
    ("length past the end", bytes([PROMPT_FIELD << 3 | 2, 100]) + b"abc",
     "not valid protobuf wire format"),
    ("deep nesting", bytes([15 << 3 | 3]) * 200, "not valid protobuf wire format"),
    ("invalid UTF-8 in prompt", bytes([PROMPT_FIELD << 3 | 2, 4]) + b"caf\xc3",
     "field 'prompt' is not valid UTF-8"),
]


class UnparseableRequestsTest(SharedServerTestCase):
    """Bytes that do not parse get INVALID_ARGUMENT saying why (gRPC itself would answer
    UNIMPLEMENTED with no message), are counted and logged, and the server keeps serving."""

    def raw(self, method, streaming=False):
        path = f"/dmdserve.v1.ImageGeneration/{method}"
        make = self.server.channel.unary_stream if streaming else self.server.channel.unary_unary
        call = make(path, request_serializer=None, response_deserializer=None)
        return lambda data: list(call(data, timeout=30)) if streaming else call(data, timeout=30)

    def test_every_method_answers_invalid_argument_naming_the_problem(self):
        calls = {"Generate": self.raw("Generate"),
                 "GenerateStream": self.raw("GenerateStream", streaming=True),
                 "ListModels": self.raw("ListModels")}
        for method, call in calls.items():
            for name, data, text in UNPARSEABLE:
                if method == "ListModels" and "prompt" in name:
                    continue  # ListModelsRequest has no prompt: those bytes are unknown fields
                with self.subTest(f"{method}: {name}"):
                    with self.assertRaises(grpc.RpcError) as ctx:
                        call(data)
                    self.assertEqual(ctx.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
                    self.assertIn("the request is not a valid dmdserve.v1.", ctx.exception.details())
                    self.assertIn(text, ctx.exception.details())
        with self.assertRaises(grpc.RpcError) as ctx:
            self.raw("Tokenize")(bytes([TEXT_FIELD << 3 | 2, 2]) + b"\xc3(")
        self.assertIn("field 'text' is not valid UTF-8", ctx.exception.details())
        ok = self.server.stub.Generate(pb.GenerateRequest(prompt=OK_PROMPT, seed=1), timeout=60)
        self.assertEqual(len(ok.images), 1)

    def test_unparseable_requests_are_counted_and_logged(self):
        with self.assertRaises(grpc.RpcError):
            self.raw("Generate")(b"\xff\xff\xff\xff\x07")
        text = self.server.metrics()
        self.assertGreaterEqual(metric_value(text, "dmdserve_requests_total", model="_unknown",
                                             method="Generate", code="INVALID_ARGUMENT"), 1)
        self.assertIn("the request is not a valid dmdserve.v1.GenerateRequest",
                      self.server.log(last=1000))


if __name__ == "__main__":
    unittest.main()
