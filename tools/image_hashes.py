#!/usr/bin/python3
"""Serves bundles with one dmdserve build and prints the SHA-256 of every image it returns.

Run it with two builds (or two sets of --flags) and diff the outputs: equal files mean the two
serve byte-identical images. Per model it asks for every prompt of PROMPTS, 1, 3 and 8 images
(as far as the model allows), at the default size and the second supported size, PNG and raw,
unary; and 2 images streamed. One line per image:

  MODEL PROMPT NUM_IMAGES WIDTH HEIGHT ENCODING unary|stream INDEX SHA256

  /usr/bin/python3 tools/image_hashes.py --build build [--flags="--channels_last_decoder=false"] \\
      models/fashion-dmd models/fashion-teacher models/tiny-random [more bundles...] > hashes.txt

SD1.5-shaped bundles to include can be exported from the tiny diffusers folder of the tests, e.g.
  /usr/bin/python3 -m tools.export_bundle \\
      --diffusers-dir tools/tests/testdata/sd-parity/tiny-sd15-diffusers \\
      --unet-checkpoint tools/tests/testdata/sd-parity/tiny-sd15-diffusers/unet_dmd_replacement.bin \\
      --recipe dmd2-sd15-1step --sizes 128x128,96x64 --out /tmp/sd15-dmd
"""
import argparse
import hashlib
import os
import shlex
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script: make the repository root importable
from tools.dmdserve_process import DmdserveProcess  # noqa: E402

PROMPTS = ["a photo of a sneaker", "an ankle boot", "a shirt with long sleeves, highly detailed",
           "!!! weird   prompt &amp; entities \u00e9\u00e8 \U0001F600"]


def ready_models(stub, pb, timeout_s=600):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        if all(m.ready for m in models):
            return models
        time.sleep(0.5)
    raise TimeoutError("the models did not become ready")


def hash_model(stub, pb, m, out):
    sizes = [(0, 0)] + [(s.width, s.height) for s in m.supported_sizes][1:2]
    for prompt in PROMPTS:
        for n in (1, 3, 8):
            if n > m.max_images_per_request:
                continue
            for w, h in sizes:
                for enc in (pb.IMAGE_ENCODING_PNG, pb.IMAGE_ENCODING_RAW):
                    req = pb.GenerateRequest(model=m.name, prompt=prompt, num_images=n,
                                             seed=1234 + n, width=w, height=h, encoding=enc)
                    for img in stub.Generate(req, timeout=600).images:
                        print(m.name, repr(prompt)[:20], n, w, h, enc, "unary", img.index,
                              hashlib.sha256(img.data).hexdigest(), file=out, flush=True)
        req = pb.GenerateRequest(model=m.name, prompt=prompt, num_images=2, seed=77)
        for img in sorted(stub.GenerateStream(req, timeout=600), key=lambda i: i.index):
            print(m.name, repr(prompt)[:20], 2, 0, 0, "PNG", "stream", img.index,
                  hashlib.sha256(img.data).hexdigest(), file=out, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", default=os.path.join(REPO, "build"))
    parser.add_argument("--flags", default="", help="extra dmdserve flags")
    parser.add_argument("bundles", nargs="+", help="bundle directories to serve")
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(args.build, "tests", "python_gen"))
    import grpc
    from dmdserve.v1 import dmdserve_pb2 as pb
    from dmdserve.v1 import dmdserve_pb2_grpc as pb_grpc

    server = DmdserveProcess(os.path.join(args.build, "server", "dmdserve"),
                             [os.path.abspath(b) for b in args.bundles], shlex.split(args.flags))
    try:
        server.wait_ready(600)
        channel = grpc.insecure_channel(server.target,
                                        options=[("grpc.max_receive_message_length", 1 << 30)])
        stub = pb_grpc.ImageGenerationStub(channel)
        for m in ready_models(stub, pb):
            hash_model(stub, pb, m, sys.stdout)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
