#!/usr/bin/python3
"""Writes request_fuzzer's seed corpus: one file per RPC shape, in request_input.h's layout.

Seeds cover each RPC with valid and invalid requests, each credential mode, and a few byte strings
that no valid message encodes (invalid UTF-8, a length past the end). The committed corpus
(tests/fuzz/corpus/request/) was written by this script; run it again after changing the API:

  /usr/bin/python3 tests/fuzz/make_request_corpus.py --stubs build/tests/python_gen \\
      tests/fuzz/corpus/request
"""
import argparse
import os
import sys

GENERATE, STREAM, TOKENIZE, LIST_MODELS = range(4)
UNLIMITED, LIMITED, FROM_INPUT, NONE = range(4)


def encode(method, auth, wire, authorization=b""):
    """request_input.h: flags byte, authorization length, authorization, request bytes."""
    return bytes([method | (auth << 2), len(authorization)]) + authorization + wire


def seeds(pb):
    gen = lambda **kw: pb.GenerateRequest(**kw).SerializeToString()
    tok = lambda **kw: pb.TokenizeRequest(**kw).SerializeToString()
    return {
        "generate_ok": encode(GENERATE, UNLIMITED, gen(
            prompt="a photo of a cat", num_images=2, seed=7, request_id="id-1")),
        "generate_stream_ok": encode(STREAM, UNLIMITED, gen(prompt="a sneaker", num_images=3)),
        "generate_teacher_raw": encode(GENERATE, UNLIMITED, gen(
            model="fake-teacher", prompt="a dress", width=28, height=28,
            encoding=pb.IMAGE_ENCODING_RAW)),
        "generate_size": encode(GENERATE, UNLIMITED, gen(prompt="a bag", width=32, height=48)),
        "generate_limited_key": encode(GENERATE, LIMITED, gen(prompt="a shirt", num_images=8)),
        "generate_empty": encode(GENERATE, UNLIMITED, b""),
        "generate_too_many": encode(GENERATE, UNLIMITED, gen(prompt="x", num_images=65)),
        "generate_width_only": encode(STREAM, UNLIMITED, gen(prompt="x", width=64)),
        "generate_bad_request_id": encode(GENERATE, UNLIMITED, gen(prompt="x", request_id="a\nb")),
        "generate_unknown_model": encode(GENERATE, UNLIMITED, gen(model="nope", prompt="x")),
        "generate_unknown_encoding": encode(GENERATE, UNLIMITED, gen(prompt="x", encoding=7)),
        "generate_long_prompt": encode(GENERATE, UNLIMITED, gen(prompt="ab " * 1366)),
        "generate_wrong_key": encode(GENERATE, FROM_INPUT, gen(prompt="x"), b"Bearer wrong"),
        "generate_no_key": encode(STREAM, NONE, gen(prompt="x")),
        "generate_key_any_case": encode(
            GENERATE, FROM_INPUT, gen(prompt="x"), b"bearer  fuzz-open-secret "),
        # field 2 (prompt), length 2, bytes that are not UTF-8
        "generate_invalid_utf8": encode(GENERATE, UNLIMITED, b"\x12\x02\xff\xfe"),
        # field 2 (prompt), length 100, 3 bytes present
        "generate_length_past_end": encode(GENERATE, UNLIMITED, b"\x12\x64abc"),
        "tokenize_ok": encode(TOKENIZE, UNLIMITED, tok(text="a photo of an astronaut riding")),
        "tokenize_model": encode(
            TOKENIZE, UNLIMITED, tok(model="fake-teacher", text="<|endoftext|>")),
        "tokenize_long": encode(TOKENIZE, UNLIMITED, tok(text="word " * 900)),
        "list_models": encode(LIST_MODELS, UNLIMITED, b""),
        "list_models_garbage": encode(LIST_MODELS, UNLIMITED, b"\x0a\xff\xff\xff\xff\x0f"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stubs", required=True,
                        help="directory holding dmdserve/v1/dmdserve_pb2.py")
    parser.add_argument("out", help="corpus directory (created)")
    args = parser.parse_args()
    sys.path.insert(0, args.stubs)
    from dmdserve.v1 import dmdserve_pb2 as pb
    os.makedirs(args.out, exist_ok=True)
    for name, data in seeds(pb).items():
        with open(os.path.join(args.out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
