#!/usr/bin/python3
"""A benchmark peer: dmdserve's gRPC API served from Python, as a team would write it in a day.

It serves one bundle (model.json + TorchScript files) with the same sampling loop as dmdserve
(tools/reference_pipeline.py) and the same tokenizer (tools/clip_tokenizer_reference.py), over
Debian's grpcio, so that scripts/bench/bench_side_by_side.py can drive it with `dmdctl bench`
exactly as it drives dmdserve. Implements dmdserve.v1.ImageGeneration (Generate, GenerateStream,
ListModels, Tokenize; PNG via PIL or raw pixels; image i uses seed + i) and grpc.health.v1.

Modes:
  --max_batch_size 16 --torch_threads 2     a dynamic batcher: one model thread runs whatever
                                            images are queued (same size), up to the maximum
  --max_batch_size 1 --request_threads 4 --torch_threads 1
                                            no batching: each of the request threads runs its
                                            own request's images, one at a time

Prints "python_peer listening on HOST:PORT" once the model is loaded and warmed up, and on
SIGUSR1 (and at exit) "python_peer batches {"batches": B, "images": I, "model_seconds": S}":
model runs so far, the images in them and the seconds they took (summed over threads).

Usage: scripts/bench/python_peer.py --bundle models/fashion-dmd [--build build] [--stubs DIR]
           [--port 0] [--max_batch_size 16] [--request_threads 16] [--torch_threads 2]
"""
import argparse
import collections
import concurrent.futures
import io
import json
import os
import random
import signal
import sys
import threading
import time

import grpc
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)  # run as a script: make the repository root importable
from tools import reference_pipeline  # noqa: E402
from tools.clip_tokenizer_reference import Tokenizer  # noqa: E402


class Model:
    """The bundle: tokenizer, modules and limits. sample() is safe from several threads."""

    def __init__(self, bundle):
        self.loaded = reference_pipeline.load(bundle)
        self.manifest = self.loaded["manifest"]
        tok = self.manifest["tokenizer"]
        self.tokenizer = Tokenizer(os.path.dirname(os.path.join(bundle, tok["vocab"])))
        self.max_tokens = tok.get("max_length", 77)
        self.uncond_ids = reference_pipeline.empty_prompt_ids(bundle, self.manifest)
        image = self.manifest["image"]
        self.name = self.manifest["name"]
        self.default_size = (image["width"], image["height"])
        self.sizes = [tuple(s) for s in image.get("supported_sizes", [self.default_size])]
        self.channels = image["channels"]
        self.max_images = self.manifest.get("max_images_per_request", 1)

    def input_ids(self, prompt):
        """(input_ids of max_tokens, truncated token count) of a prompt."""
        return self.tokenizer.for_model(self.tokenizer.encode(prompt), self.max_tokens)

    def sample(self, items, size):
        """uint8 [N, H, W, C] images of items ({"input_ids", "seed"}) at size (width, height)."""
        return reference_pipeline.sample(self.loaded, items, size[0], size[1], self.uncond_ids)


class Stats:
    """Model runs so far: batches, images in them and seconds spent in them (summed over the
    threads that run the model). Thread safety: add() and snapshot() from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._batches = self._images = 0
        self._seconds = 0.0

    def add(self, images, seconds):
        with self._lock:
            self._batches += 1
            self._images += images
            self._seconds += seconds

    def snapshot(self):
        with self._lock:
            return {"batches": self._batches, "images": self._images,
                    "model_seconds": self._seconds}


def timed_sample(model, stats, items, size):
    """model.sample(items, size), its run counted in stats."""
    start = time.perf_counter()
    pixels = model.sample(items, size)
    stats.add(len(items), time.perf_counter() - start)
    return pixels


class Work:
    """One image waiting for the batcher; `done` is set once `pixels` (or `error`) is filled."""

    def __init__(self, input_ids, seed, size):
        self.item = {"input_ids": input_ids, "seed": seed}
        self.size = size
        self.pixels = None
        self.error = None
        self.batch_size = 0
        self.done = threading.Event()


class Batcher:
    """One model thread: takes every queued image of the first image's size, up to
    max_batch_size, and runs them as one batch. Thread safety: submit() from any thread."""

    def __init__(self, model, max_batch_size, stats):
        self._model = model
        self._max = max_batch_size
        self._stats = stats
        self._queue = collections.deque()
        self._cv = threading.Condition()
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, works):
        with self._cv:
            self._queue.extend(works)
            self._cv.notify()

    def _take(self):
        with self._cv:
            while not self._queue:
                self._cv.wait()
            size = self._queue[0].size
            batch, rest = [], collections.deque()
            while self._queue and len(batch) < self._max:
                work = self._queue.popleft()
                (batch if work.size == size else rest).append(work)
            self._queue.extendleft(reversed(rest))
            return batch

    def _loop(self):
        while True:
            batch = self._take()
            try:
                pixels = timed_sample(self._model, self._stats, [w.item for w in batch],
                                      batch[0].size)
            except Exception as e:  # noqa: BLE001 - reported to every request of the batch
                pixels = None
                for w in batch:
                    w.error = e
            for i, w in enumerate(batch):
                if pixels is not None:
                    w.pixels = pixels[i]
                w.batch_size = len(batch)
                w.done.set()


def encode(pb, pixels, encoding):
    """(encoding enum, bytes) of one uint8 [H, W, C] image."""
    if encoding == pb.IMAGE_ENCODING_RAW:
        return encoding, pixels.numpy().tobytes()
    array = pixels.numpy()
    image = Image.fromarray(array[:, :, 0], "L") if array.shape[2] == 1 else \
        Image.fromarray(array, "RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return pb.IMAGE_ENCODING_PNG, out.getvalue()


def make_servicer(pb, pb_grpc, model, batcher, stats):
    """The ImageGeneration servicer; batcher None: each request thread runs its own images."""

    def fail(context, code, message):
        context.abort(code, message)

    def validate(request, context):
        if not request.prompt:
            fail(context, grpc.StatusCode.INVALID_ARGUMENT, "prompt: must not be empty")
        if request.model and request.model != model.name:
            fail(context, grpc.StatusCode.NOT_FOUND, f"model: no model named {request.model}")
        n = request.num_images or 1
        if not 1 <= n <= model.max_images:
            fail(context, grpc.StatusCode.INVALID_ARGUMENT,
                 f"num_images: must be in [0, {model.max_images}], got {request.num_images}")
        size = (request.width, request.height) if request.width or request.height \
            else model.default_size
        if size not in model.sizes:
            fail(context, grpc.StatusCode.INVALID_ARGUMENT,
                 f"width, height: {size[0]}x{size[1]} is not a size the model supports")
        return n, size

    def generate(request, context):
        """(pixels of each image, seeds, truncated tokens, largest batch, timings dict)."""
        start = time.monotonic()
        n, size = validate(request, context)
        ids, truncated = model.input_ids(request.prompt)
        seed = request.seed if request.HasField("seed") else random.getrandbits(64)
        seeds = [(seed + i) % (1 << 64) for i in range(n)]
        if batcher is None:
            pixels = [timed_sample(model, stats, [{"input_ids": ids, "seed": s}], size)[0]
                      for s in seeds]
            batch = 1
        else:
            works = [Work(ids, s, size) for s in seeds]
            batcher.submit(works)
            for w in works:
                w.done.wait()
                if w.error is not None:
                    fail(context, grpc.StatusCode.INTERNAL, f"pipeline: {w.error}")
            pixels = [w.pixels for w in works]
            batch = max(w.batch_size for w in works)
        return pixels, seeds, truncated, batch, start

    def image_message(request, index, seed, pixels):
        encoding, data = encode(pb, pixels, request.encoding)
        return pb.GeneratedImage(index=index, seed=seed, width=pixels.shape[1],
                                 height=pixels.shape[0], channels=pixels.shape[2],
                                 encoding=encoding, data=data)

    class Servicer(pb_grpc.ImageGenerationServicer):
        def Generate(self, request, context):
            pixels, seeds, truncated, batch, start = generate(request, context)
            images = [image_message(request, i, s, p)
                      for i, (s, p) in enumerate(zip(seeds, pixels))]
            timings = pb.Timings(total_seconds=time.monotonic() - start, batch_size=batch)
            return pb.GenerateResponse(request_id=request.request_id, model=model.name,
                                       images=images, timings=timings, truncated_tokens=truncated)

        def GenerateStream(self, request, context):
            pixels, seeds, truncated, _, _ = generate(request, context)
            for i, (s, p) in enumerate(zip(seeds, pixels)):
                image = image_message(request, i, s, p)
                image.request_id, image.model = request.request_id, model.name
                image.truncated_tokens = truncated
                yield image

        def ListModels(self, request, context):
            w, h = model.default_size
            info = pb.ModelInfo(
                name=model.name, width=w, height=h, channels=model.channels,
                steps=len(model.manifest["schedule"]["timesteps"]), is_default=True,
                max_images_per_request=model.max_images, ready=True,
                supported_sizes=[pb.ImageSize(width=a, height=b) for a, b in model.sizes],
                max_tokens=model.max_tokens, description=model.manifest.get("description", ""))
            return pb.ListModelsResponse(models=[info])

        def Tokenize(self, request, context):
            ids = model.tokenizer.encode(request.text)
            input_ids, truncated = model.tokenizer.for_model(ids, model.max_tokens)
            inverse = {v: k for k, v in model.tokenizer.vocab.items()}
            return pb.TokenizeResponse(ids=ids, tokens=[inverse[i] for i in ids],
                                       input_ids=input_ids, truncated_tokens=truncated,
                                       model=model.name)

    return Servicer()


def make_health(health_pb2, health_pb2_grpc):
    class Health(health_pb2_grpc.HealthServicer):
        def Check(self, request, context):
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    return Health()


def warm_up(model, max_batch_size):
    """Runs each batch size the batcher can form once per size, so the first requests do not
    pay for TorchScript's first runs (dmdserve warms up too)."""
    ids, _ = model.input_ids("warm-up")
    for size in model.sizes:
        for n in sorted({1, max_batch_size}):
            for _ in range(2):
                model.sample([{"input_ids": ids, "seed": i} for i in range(n)], size)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--build", default=os.path.join(REPO, "build"))
    parser.add_argument("--stubs", help="generated Python stubs (default BUILD/tests/python_gen)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--max_batch_size", type=int, default=16,
                        help="images per model run; 1: no batcher, request threads run the model")
    parser.add_argument("--request_threads", type=int, default=32, help="gRPC handler threads")
    parser.add_argument("--torch_threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()

    sys.path.insert(0, args.stubs or os.path.join(args.build, "tests", "python_gen"))
    from dmdserve.v1 import dmdserve_pb2 as pb  # noqa: E402 - the stubs live in the build
    from dmdserve.v1 import dmdserve_pb2_grpc as pb_grpc  # noqa: E402
    from grpc_health_v1 import health_pb2, health_pb2_grpc  # noqa: E402

    torch.set_num_threads(args.torch_threads)
    model = Model(args.bundle)
    warm_up(model, args.max_batch_size)
    stats = Stats()
    batcher = Batcher(model, args.max_batch_size, stats) if args.max_batch_size > 1 else None

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(args.request_threads),
                         options=[("grpc.max_send_message_length", 64 << 20)])
    pb_grpc.add_ImageGenerationServicer_to_server(
        make_servicer(pb, pb_grpc, model, batcher, stats), server)
    health_pb2_grpc.add_HealthServicer_to_server(make_health(health_pb2, health_pb2_grpc), server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    print(f"python_peer listening on {args.host}:{port}", flush=True)

    def print_batches(*_):
        print("python_peer batches " + json.dumps(stats.snapshot()), flush=True)

    # SIGUSR1: print the model-run counters (the benchmark driver reads the mean batch size and
    # the time spent in the model so).
    signal.signal(signal.SIGUSR1, print_batches)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1):
        pass
    server.stop(5).wait()
    print_batches()


if __name__ == "__main__":
    main()
