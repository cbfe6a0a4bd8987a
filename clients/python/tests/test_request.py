"""Request building: the clients' arguments become GenerateRequest/TokenizeRequest fields; what
protobuf could not carry is refused with InvalidArgumentError naming the argument."""
import unittest

import dmdserve
from dmdserve._request import auth_metadata, generate_request, parse_size, tokenize_request
from dmdserve.v1 import dmdserve_pb2 as pb


class RequestTest(unittest.TestCase):
    def test_generate_arguments_map_to_the_proto_fields(self):
        r = generate_request("a boot", 3, seed=2**64 - 1, size="64x32", model="m",
                             encoding="raw", request_id="r-1")
        self.assertEqual(r, pb.GenerateRequest(prompt="a boot", num_images=3, seed=2**64 - 1,
                                               width=64, height=32, model="m",
                                               encoding=pb.IMAGE_ENCODING_RAW, request_id="r-1"))

    def test_defaults_leave_the_choices_to_the_server(self):
        r = generate_request("a boot")
        self.assertEqual((r.num_images, r.width, r.height, r.model, r.request_id), (1, 0, 0, "", ""))
        self.assertFalse(r.HasField("seed"))  # the server draws one
        self.assertEqual(r.encoding, pb.IMAGE_ENCODING_PNG)
        self.assertEqual(generate_request("x", seed=0).seed, 0)
        self.assertTrue(generate_request("x", seed=0).HasField("seed"))

    def test_sizes_in_every_accepted_form(self):
        for size in ((64, 32), [64, 32], "64x32", " 64 X 32 ", dmdserve.ImageSize(64, 32)):
            with self.subTest(size=size):
                self.assertEqual(parse_size(size), (64, 32))
                self.assertEqual(parse_size(size).width, 64)
        self.assertEqual(parse_size(None), (0, 0))

    def test_what_cannot_be_sent_is_refused_naming_the_argument(self):
        cases = [
            ({"size": "64"}, "size"), ({"size": (64,)}, "size"), ({"size": (64, -1)}, "height"),
            ({"size": (2**31, 1)}, "width"), ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"),
            ({"seed": 1.5}, "seed"), ({"n": 0}, "n"), ({"n": True}, "n"), ({"n": 2**31}, "n"),
            ({"encoding": "jpeg"}, "encoding"), ({"model": 3}, "model"),
            ({"prompt": b"bytes"}, "prompt"),
        ]
        for kwargs, name in cases:
            with self.subTest(**{k: repr(v) for k, v in kwargs.items()}):
                kwargs.setdefault("prompt", "a boot")
                with self.assertRaises(dmdserve.InvalidArgumentError) as caught:
                    generate_request(**kwargs)
                self.assertIn(name, caught.exception.message)

    def test_an_empty_prompt_is_left_to_the_server(self):
        self.assertEqual(generate_request("").prompt, "")  # INVALID_ARGUMENT comes from it

    def test_tokenize_request(self):
        self.assertEqual(tokenize_request("a red fox", "m"),
                         pb.TokenizeRequest(text="a red fox", model="m"))
        with self.assertRaises(dmdserve.InvalidArgumentError):
            tokenize_request(None)

    def test_api_key_metadata(self):
        self.assertEqual(auth_metadata("s3cret"), (("authorization", "Bearer s3cret"),))
        self.assertEqual(auth_metadata(None), ())
        self.assertEqual(auth_metadata(""), ())
        with self.assertRaises(ValueError):
            auth_metadata("two\nlines")

    def test_encoding_names(self):
        self.assertIs(dmdserve.Encoding.parse("PNG"), dmdserve.Encoding.PNG)
        self.assertIs(dmdserve.Encoding.parse(dmdserve.Encoding.RAW), dmdserve.Encoding.RAW)


if __name__ == "__main__":
    unittest.main()
