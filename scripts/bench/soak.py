#!/usr/bin/python3
"""Soak and chaos run against the real dmdserve: minutes of open-loop load at a multiple of the
measured capacity, with injected faults, hostile clients and bad inputs; every request accounted
for; the server's resources tracked; a clean drain at the end.

1. Builds two faulty copies of the tiny bundle (tests/fixtures/make_faulty_bundle.py): model
   `faulty` raises in its text encoder and model `oom` allocates 1 PiB whenever a prompt holds
   the token "boom". One server serves them beside the healthy bundle, on free loopback ports.
2. Measures capacity: `dmdctl bench`, closed loop, 1-image requests (images/s).
3. For --minutes, offers --load_factor x capacity in images/s to the healthy model as a Poisson
   stream of requests (open loop: arrivals never wait for answers), mixed: unary Generate,
   GenerateStream read to the end, clients that cancel mid-flight, streams cancelled after their
   first image, streams never read until their deadline, clients that close their connection
   mid-stream, deadlines of a few milliseconds; and, 30% of the requests, the same over the HTTP
   API (soak_http.py): OpenAI generations, native generate, native streams read to the end or
   closed after their first line, X-Request-Timeout of a few milliseconds. Beside
   it at fixed rates: requests that make the faulty models raise or run out of memory, bad inputs
   (invalid fields, unparseable bytes, oversize prompt, message and headers; HTTP: bad JSON,
   unknown fields, wrong types, bodies over the limit, unknown paths, wrong methods), Tokenize,
   ListModels, health checks, hostile HTTP clients (half a request's headers then a stall, a
   request whose answer is never read, connections without a request), and a /metrics scrape
   every 5 s.
4. Samples the server's RSS, open fds and threads every second.
5. After the load: every request must have ended with a status its kind allows; the server's
   dmdserve_requests_total must agree with the client's counts; in-flight requests and queues
   back to 0; resources no longer growing after warm-up; the normal HTTP requests' p99 latency
   within max(3x, +1 s) of gRPC's while the hostile HTTP clients were held open; health SERVING
   and a normal request OK on every model; then SIGTERM with a gRPC and HTTP burst in flight:
   every request OK with every image, new HTTP requests 503, and exit code 0.

Prints a Markdown report (docs/RELIABILITY.md's tables come from it) and exits 1 when an
invariant fails (each failure is listed), 2 when the run itself could not be set up.

Usage: scripts/bench/soak.py [--build build] [--bundle models/fashion-dmd] [--minutes 5]
           [--load_factor 2] [--json_out FILE] [--log_out FILE] [-- server flags...]
"""
import argparse
import asyncio
import collections
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from bench_common import REPO, dmdctl_bench, git_commit, machine_line, today, write_prompts
import soak_http as sh
import soak_report as sr
from tools.dmdserve_process import DmdserveProcess

TRIGGER_WORD = "boom"
HEALTHY_DEADLINE_S = 60
LOST_AFTER_S = HEALTHY_DEADLINE_S + 30  # no final status by then: the request is lost
MAX_RECEIVE = 256 << 20

# Share of the healthy model's requests per kind, and the images each asks for: 70% gRPC, 30%
# HTTP (soak_http.py).
LOAD_MIX = {
    "generate": (0.38, (1, 1, 2, 4, 8)),
    "stream": (0.14, (2, 4, 8)),
    "cancel_mid_flight": (0.07, (1, 2, 4)),
    "short_deadline": (0.06, (1, 2, 4)),
    "stream_cancel_after_first": (0.03, (4, 8)),
    "stream_never_read": (0.015, (16,)),
    "disconnect_mid_flight": (0.015, (4, 8)),
    "http_images": (0.10, (1, 2, 4)),
    "http_generate": (0.08, (1, 1, 2, 4, 8)),
    "http_stream": (0.06, (2, 4, 8)),
    "http_stream_abandon": (0.03, (4, 8)),
    "http_short_deadline": (0.03, (1, 2, 4)),
}
# Requests per second of the side kinds.
SIDE_RATES = {"fault_raise": 2.0, "fault_oom": 2.0, "bad": 5.0, "tokenize": 2.0,
              "list_models": 0.5, "health": 1.0, "oversize_message": 0.2,
              "oversize_metadata": 0.2,
              "http_bad": 4.0, "http_tokenize": 1.0, "http_models": 0.5, "http_list_models": 0.5,
              "http_slowloris": 1.0, "http_never_read": 0.5, "http_idle_connect": 1.0}


def _seconds(x):
    return "none" if x is None else f"{x:.2f} s"


def own_sockets():
    """Sockets open in this process (its connections to the server, and a few of its own)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:  # closed meanwhile
            pass
    return count


class Sampler(threading.Thread):
    """Samples a process's RSS (MiB), open fds and threads every `interval_s` into `samples`
    (dicts with t = seconds since `t0`), and its fds beyond the sockets this (client) process
    holds at the same moment: each client connection is one fd at each end, so that figure
    stays flat while connections come and go, and grows only with what the server keeps for
    itself. Stops when asked or when the process is gone."""

    def __init__(self, pid, t0, interval_s=1.0):
        super().__init__(daemon=True)
        self.pid, self.t0, self.interval_s = pid, t0, interval_s
        self.samples = []
        self._stop_event = threading.Event()

    def read(self):
        fields = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value.split()
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        return {"t": time.monotonic() - self.t0, "rss_mib": round(int(fields["VmRSS"][0]) / 1024, 1),
                "threads": int(fields["Threads"][0]), "fds": fds,
                "fds_beyond_clients": fds - own_sockets()}

    def run(self):
        while True:
            try:
                self.samples.append(self.read())
            except (OSError, KeyError, ValueError):
                return
            if self._stop_event.wait(self.interval_s):
                return

    def stop(self):
        self._stop_event.set()
        self.join(10)


class Scraper(threading.Thread):
    """GETs /metrics every `interval_s` until stopped; counts answers and failures."""

    def __init__(self, url, interval_s=5.0):
        super().__init__(daemon=True)
        self.url, self.interval_s = url, interval_s
        self.ok, self.failed = 0, []
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.wait(self.interval_s):
            try:
                with urllib.request.urlopen(self.url, timeout=10) as r:
                    r.read()
                self.ok += 1
            except OSError as e:
                self.failed.append(str(e))

    def stop(self):
        self._stop_event.set()
        self.join(20)


def make_faulty_bundles(tmp, source_bundle):
    """Bundles `faulty` (raises) and `oom` (allocates 1 PiB) from `source_bundle`, triggered by
    TRIGGER_WORD; returns (their directories, the trigger's token id)."""
    with open(os.path.join(source_bundle, "tokenizer", "vocab.json")) as f:
        trigger_id = json.load(f)[TRIGGER_WORD + "</w>"]
    dirs = []
    for fault in ("raise", "oom"):
        out = os.path.join(tmp, fault)
        subprocess.run([sys.executable, os.path.join(REPO, "tests", "fixtures",
                                                     "make_faulty_bundle.py"),
                        "--src", source_bundle, "--out", out, "--trigger-id", str(trigger_id),
                        "--fault", fault], check=True)
        dirs.append(out)
    return dirs, trigger_id


def grpc_request_bytes(authority, path, message):
    """The bytes a client sends for one gRPC call over cleartext HTTP/2 (prior knowledge): the
    connection preface, empty SETTINGS, HEADERS (HPACK literals, no Huffman) and one DATA frame
    holding the length-prefixed message, ending the stream."""
    def string(text):
        data = text.encode()
        assert len(data) < 127  # a one-byte HPACK length
        return bytes([len(data)]) + data

    def frame(kind, flags, stream, payload):
        return (len(payload).to_bytes(3, "big") + bytes([kind, flags]) +
                stream.to_bytes(4, "big") + payload)

    headers = b"".join(b"\x00" + string(k) + string(v) for k, v in (
        (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority),
        ("content-type", "application/grpc"), ("te", "trailers")))
    return (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(0x4, 0, 0, b"") +
            frame(0x1, 0x4, 1, headers) +  # HEADERS, END_HEADERS
            frame(0x0, 0x1, 1, b"\x00" + len(message).to_bytes(4, "big") + message))  # END_STREAM


def metrics_text(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def bad_inputs(pb, healthy, max_prompt_bytes):
    """(case, method, request message or raw bytes, expected label) for every bad input sent."""
    ok = "a photo of a sneaker"
    prompt_field = pb.GenerateRequest.DESCRIPTOR.fields_by_name["prompt"].number
    g = pb.GenerateRequest
    cases = [
        ("missing prompt", "Generate", g(), "INVALID_ARGUMENT"),
        ("prompt over the limit", "Generate", g(prompt="a" * (max_prompt_bytes + 1)),
         "INVALID_ARGUMENT"),
        ("negative num_images", "Generate", g(prompt=ok, num_images=-1), "INVALID_ARGUMENT"),
        ("num_images over the limit", "Generate", g(prompt=ok, num_images=100000),
         "INVALID_ARGUMENT"),
        ("unknown model", "Generate", g(prompt=ok, model="no-such-model"), "NOT_FOUND"),
        ("model name not printable", "Generate", g(prompt=ok, model="a\nb"), "INVALID_ARGUMENT"),
        ("width without height", "Generate", g(prompt=ok, width=32), "INVALID_ARGUMENT"),
        ("unsupported size", "Generate", g(prompt=ok, width=4096, height=4096),
         "INVALID_ARGUMENT"),
        ("unknown encoding", "Generate", g(prompt=ok, encoding=7), "INVALID_ARGUMENT"),
        ("request_id too long", "Generate", g(prompt=ok, request_id="r" * 129),
         "INVALID_ARGUMENT"),
        ("stream without prompt", "GenerateStream", g(model=healthy), "INVALID_ARGUMENT"),
        ("tokenize text over the limit", "Tokenize",
         pb.TokenizeRequest(text="b" * (max_prompt_bytes + 1)), "INVALID_ARGUMENT"),
        ("random bytes", "raw:Generate", b"\xff\xff\xff\xff\x07", "INVALID_ARGUMENT"),
        ("length past the end", "raw:Generate", bytes([prompt_field << 3 | 2, 100]) + b"abc",
         "INVALID_ARGUMENT"),
        ("deep nesting", "raw:GenerateStream", bytes([15 << 3 | 3]) * 200, "INVALID_ARGUMENT"),
        ("prompt not UTF-8", "raw:Generate", bytes([prompt_field << 3 | 2, 4]) + b"caf\xc3",
         "INVALID_ARGUMENT"),
    ]
    for case, method, _, expected in cases:
        sr.add_bad_input_kind(case, method.replace("raw:", ""), expected)
    return cases


class Load:
    """The open-loop load of one run, on an asyncio loop: channels, the request kinds, the
    arrival process. Every request goes through `ledger`."""

    def __init__(self, grpc, pb, pb_grpc, health_pb2, health_grpc, target, healthy, ledger,
                 rng, max_prompt_bytes, http):
        self.grpc, self.pb, self.pb_grpc, self.health_pb2 = grpc, pb, pb_grpc, health_pb2
        self.target = target
        self.healthy, self.ledger, self.rng = healthy, ledger, rng
        # Separate connections for the clients that misbehave: a stream never read fills its
        # connection's flow-control window, and headers over the limit close their connection
        # (failing every call on it). Channels with equal arguments would share one connection
        # (gRPC's global subchannel pool): each gets its own pool.
        options = [("grpc.max_receive_message_length", MAX_RECEIVE),
                   ("grpc.use_local_subchannel_pool", 1)]
        self.options = options
        self.channel = grpc.aio.insecure_channel(target, options=options)
        # The never-read streams' connection offers the server a small window and does not
        # grow it (no BDP probing): the server's writes really stall.
        self.unread_channel = grpc.aio.insecure_channel(
            target, options=options + [("grpc.http2.bdp_probe", 0),
                                       ("grpc.http2.lookahead_bytes", 1024)])
        self.hostile_channel = grpc.aio.insecure_channel(target, options=options)
        self.metadata_channel = grpc.aio.insecure_channel(target, options=options)
        self.channels = [self.channel, self.unread_channel, self.hostile_channel,
                         self.metadata_channel]
        self.stub = pb_grpc.ImageGenerationStub(self.channel)
        self.unread_stub = pb_grpc.ImageGenerationStub(self.unread_channel)
        self.metadata_stub = pb_grpc.ImageGenerationStub(self.metadata_channel)
        self.health = health_grpc.HealthStub(self.channel)
        self.metadata_lock = asyncio.Lock()  # one oversize-headers call at a time
        self.bad = bad_inputs(pb, healthy, max_prompt_bytes)
        self.bad_next = 0
        self.counter = 0
        self.launched = collections.Counter()  # drive kind -> requests launched
        self.lags = []  # seconds each drive arrival was sent after its scheduled time
        self.max_images = 16  # the healthy model's limit, set once known
        self.tasks = set()
        # The HTTP kinds: http(prompt maker) -> soak_http.HttpClients.
        self.http = http(self._prompt)

    def _prompt(self, word=""):
        self.counter += 1
        return f"{word} a photo of item {self.counter} in the catalogue".strip()

    def _request(self, n, model=None, word="", **fields):
        return self.pb.GenerateRequest(model=model or self.healthy, prompt=self._prompt(word),
                                       num_images=n, seed=self.counter, **fields)

    def _error(self, e):
        return sr.label(e.code().name, e.details()), 0, e.details()

    # Each kind: a coroutine returning (label, images received, details).
    async def generate(self, n, model=None, word="", timeout=HEALTHY_DEADLINE_S):
        try:
            response = await self.stub.Generate(self._request(n, model, word), timeout=timeout)
        except self.grpc.aio.AioRpcError as e:
            return self._error(e)
        got = len(response.images)
        return ("OK" if got == n else "OK(missing images)"), got, ""

    async def stream(self, n):
        call = self.stub.GenerateStream(self._request(n), timeout=HEALTHY_DEADLINE_S)
        indices = set()
        try:
            async for image in call:
                indices.add(image.index)
        except self.grpc.aio.AioRpcError as e:
            return self._error(e)
        return ("OK" if indices == set(range(n)) else "OK(missing images)"), len(indices), ""

    async def _code_after_cancel(self, call):
        code, details = await call.code(), await call.details()
        return sr.label(code.name, details), details

    async def cancel_mid_flight(self, n):
        call = self.stub.Generate(self._request(n), timeout=HEALTHY_DEADLINE_S)
        await asyncio.sleep(self.rng.uniform(0, 0.05))
        call.cancel()
        status, details = await self._code_after_cancel(call)
        return status, (len((await call).images) if status == "OK" else 0), details

    async def stream_cancel_after_first(self, n):
        call = self.stub.GenerateStream(self._request(n), timeout=HEALTHY_DEADLINE_S)
        try:
            async for _ in call:
                call.cancel()
                break
        except self.grpc.aio.AioRpcError as e:
            return self._error(e)
        status, details = await self._code_after_cancel(call)
        return status, (n if status == "OK" else 0), details

    async def stream_never_read(self, n):
        call = self.unread_stub.GenerateStream(
            self._request(n, encoding=self.pb.IMAGE_ENCODING_RAW),
            timeout=self.rng.uniform(1, 4))
        status, details = await self._code_after_cancel(call)  # never reads a message
        return status, 0, details

    async def disconnect_mid_flight(self, n):
        """A client that opens its own TCP connection, sends a GenerateStream request in plain
        HTTP/2 frames, and resets the connection (SO_LINGER 0) 0-50 ms later without reading.
        Its final status is its own disconnect; the server's side is checked by its counters,
        in-flight gauge and fds. (Raw frames, because grpc.aio's channel close() does not
        always cancel a call nobody awaits, which then ends at its deadline instead.)"""
        host, port = self.target.rsplit(":", 1)
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(grpc_request_bytes(self.target, "/dmdserve.v1.ImageGeneration/GenerateStream",
                                        self._request(n).SerializeToString()))
        await writer.drain()
        await asyncio.sleep(self.rng.uniform(0, 0.05))
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   struct.pack("ii", 1, 0))
        writer.transport.abort()
        return "DISCONNECTED", 0, ""

    async def short_deadline(self, n):
        return await self.generate(n, timeout=self.rng.uniform(0.001, 0.03))

    async def tokenize(self, _):
        await self.stub.Tokenize(self.pb.TokenizeRequest(text=self._prompt()), timeout=30)
        return "OK", 0, ""

    async def list_models(self, _):
        await self.stub.ListModels(self.pb.ListModelsRequest(), timeout=30)
        return "OK", 0, ""

    async def health_check(self, _):
        r = await self.health.Check(self.health_pb2.HealthCheckRequest(service=""), timeout=30)
        return self.health_pb2.HealthCheckResponse.ServingStatus.Name(r.status), 0, ""

    async def oversize_message(self, _):
        call = self.hostile_channel.unary_unary("/dmdserve.v1.ImageGeneration/Generate")
        data = self.pb.GenerateRequest(prompt="a" * (5 << 20)).SerializeToString()
        await call(data, timeout=30)
        return "OK", 0, ""

    async def oversize_metadata(self, _):
        async with self.metadata_lock:
            await self.metadata_stub.ListModels(self.pb.ListModelsRequest(), timeout=30,
                                                metadata=[("x-pad", "a" * (65 << 10))])
        return "OK", 0, ""

    async def bad_input(self, case, method, message):
        if method.startswith("raw:"):
            path = "/dmdserve.v1.ImageGeneration/" + method[4:]
            make = (self.channel.unary_stream if method.endswith("Stream")
                    else self.channel.unary_unary)
            call = make(path)(message, timeout=30)
        else:
            call = getattr(self.stub, method)(message, timeout=30)
        if method.endswith("Stream"):
            async for _ in call:
                pass
        else:
            await call
        return "OK", 0, ""

    def choose(self, kind):
        """(ledger kind, images, coroutine) of one request of `kind`."""
        if kind in LOAD_MIX:
            n = min(self.rng.choice(LOAD_MIX[kind][1]), self.max_images)
            return kind, n, getattr(self.http if kind.startswith("http_") else self, kind)(n)
        if kind == "fault_raise":
            return kind, 1, self.generate(self.rng.choice((1, 2)), "faulty", TRIGGER_WORD)
        if kind == "fault_oom":
            return kind, 1, self.generate(self.rng.choice((1, 2)), "oom", TRIGGER_WORD)
        if kind == "bad":
            case, method, message, _ = self.bad[self.bad_next % len(self.bad)]
            self.bad_next += 1
            return sr.BAD_PREFIX + case, 0, self.bad_input(case, method, message)
        if kind == "http_bad":
            bad_kind, coroutine = self.http.next_bad()
            return bad_kind, 0, coroutine
        if kind.startswith("http_"):
            return kind, 0, getattr(self.http, kind)(0)
        method = {"health": self.health_check}.get(kind) or getattr(self, kind)
        return kind, 0, method(0)

    async def one(self, kind):
        kind, images, coroutine = self.choose(kind)
        request = self.ledger.start(kind, images)
        started = time.monotonic()
        try:
            status, got, details = await asyncio.wait_for(coroutine, LOST_AFTER_S)
        except asyncio.TimeoutError:
            return  # left open in the ledger: lost
        except self.grpc.aio.AioRpcError as e:
            status, got, details = self._error(e)
        except (OSError, sh.HttpBroken) as e:  # an HTTP kind that could not even connect
            status, got, details = f"BROKEN({type(e).__name__})", 0, str(e)
        self.ledger.finish(request, status, time.monotonic() - started, got, details)

    def launch(self, kind):
        self.launched[kind] += 1
        task = asyncio.get_running_loop().create_task(self.one(kind))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def drive(self, rates, duration_s):
        """Poisson arrivals of `rates` (kind -> requests/s) for `duration_s`, then one request
        of every kind (and every bad input) that chance left out, so a short run still tries
        them all; returns when the last one is sent (not answered). Behind schedule, it sends
        at once (open loop)."""
        loop = asyncio.get_running_loop()
        kinds, weights = list(rates), list(rates.values())
        total = sum(weights)
        next_at = loop.time()
        end = next_at + duration_s
        while True:
            next_at += self.rng.expovariate(total)
            if next_at >= end:
                break
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            self.lags.append(max(0.0, loop.time() - next_at))
            self.launch(self.rng.choices(kinds, weights)[0])
        self.top_up(kinds)

    def top_up(self, kinds):
        """Launches one request of each of `kinds` never launched, and the bad inputs not yet
        sent (each bad kind sends its cases in turn)."""
        for kind in kinds:
            if not self.launched[kind]:
                self.launch(kind)
        for kind, cases in (("bad", self.bad), ("http_bad", self.http.bad)):
            if kind in kinds:
                for _ in range(len(cases) - self.launched[kind]):
                    self.launch(kind)

    async def settle(self):
        """Waits for every request still running (each ends by LOST_AFTER_S)."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=LOST_AFTER_S + 5)

    async def close(self):
        for channel in self.channels:
            await channel.close()


def load_rates(target_images_per_s):
    """kind -> requests/s: the healthy mix sized to offer `target_images_per_s`, plus
    SIDE_RATES."""
    mean_images = sum(share * sum(sizes) / len(sizes) for share, sizes in LOAD_MIX.values())
    requests = target_images_per_s / mean_images
    return {**{kind: requests * share for kind, (share, _) in LOAD_MIX.items()}, **SIDE_RATES}


def wait_idle(metrics_port, models, timeout_s=60):
    """Waits until no request is in flight and no image queued on any model; returns whether
    that happened, and the last exposition read."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = metrics_text(metrics_port)
        busy = sum(sr.metric_sum(text, name, model=m) for m in models
                   for name in ("dmdserve_requests_in_flight", "dmdserve_queue_depth_images"))
        if busy == 0 or time.monotonic() > deadline:
            return busy == 0, text
        time.sleep(0.2)


async def after_load_checks(load, models, checks):
    """Health SERVING and a normal request OK on every model (the faulty ones included: their
    workers survived the faults)."""
    pb, health_pb2 = load.pb, load.health_pb2
    status = await load.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    checks.append(("health SERVING after the load",
                   status.status == health_pb2.HealthCheckResponse.SERVING))
    for model in models:
        try:
            r = await load.stub.Generate(pb.GenerateRequest(model=model, prompt="a bag",
                                                            num_images=2, seed=1), timeout=60)
            ok = len(r.images) == 2
        except load.grpc.aio.AioRpcError:
            ok = False
        checks.append((f"a normal request to '{model}' OK after the load", ok))


# The drain's HTTP requests: (kind, how many) in the burst, and the routes of the requests sent
# after SIGTERM (each must get 503).
DRAIN_HTTP = (("http_images", 2), ("http_generate", 2), ("http_stream", 2))
AFTER_SIGTERM_HTTP = ("/v1/images/generations", "/v1/generate", "/v1/generate:stream")


async def drain_burst(load, server, requests, images):
    """Sends `requests` gRPC requests of `images` images and DRAIN_HTTP's HTTP ones, sends SIGTERM
    once the server accepted them all, then, once it drains, one new HTTP request per
    AFTER_SIGTERM_HTTP route. Returns (how many were unfinished at SIGTERM, the gRPC results,
    the HTTP results (label, images), the after-SIGTERM labels)."""
    pb = load.pb
    before = sr.parse_requests_total(metrics_text(server.metrics_port))
    probes = await sh.open_probes(load.http, len(AFTER_SIGTERM_HTTP))
    calls = [load.stub.Generate(pb.GenerateRequest(model=load.healthy, prompt=f"a coat {i}",
                                                   num_images=images, seed=i), timeout=120)
             for i in range(requests)]
    tasks = [asyncio.ensure_future(c) for c in calls]
    http_tasks = [asyncio.ensure_future(getattr(load.http, kind)(images))
                  for kind, count in DRAIN_HTTP for _ in range(count)]
    requests += len(http_tasks)
    loop = asyncio.get_running_loop()
    unfinished = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = await loop.run_in_executor(None, metrics_text, server.metrics_port)
        finished = sum(sr.delta(sr.parse_requests_total(text), before).values())
        unfinished = sr.metric_sum(text, "dmdserve_requests_in_flight", model=load.healthy)
        if finished + unfinished >= requests:
            break
        await asyncio.sleep(0.01)
    server.terminate()
    while not any("draining: finishing" in line for line in server.lines[-50:]):
        if time.monotonic() > deadline + 30:
            break
        await asyncio.sleep(0.001)
    after = await asyncio.gather(*(sh.send_probe(load.http, probe, path, images)
                                   for probe, path in zip(probes, AFTER_SIGTERM_HTTP)))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    http_results = await asyncio.gather(*http_tasks, return_exceptions=True)
    return int(unfinished), results, http_results, after


class SetupError(Exception):
    """The run could not be set up (exit 2): no server, no capacity, a broken fixture."""


def flag_value(flags, name, default):
    for flag in flags:
        if flag.startswith(f"--{name}="):
            return int(flag.split("=", 1)[1])
    return default


def measure_capacity(args, target, prompts):
    report = dmdctl_bench(args.build, target, args.capacity_concurrency, args.capacity_s, 1,
                          prompts)
    return {"concurrency": args.capacity_concurrency, "seconds": args.capacity_s,
            "images_per_second": report["images_per_second"],
            "status_codes": report.get("status_codes")}


def import_stubs(build):
    sys.path.insert(0, os.path.join(os.path.abspath(build), "tests", "python_gen"))
    import grpc
    import grpc.aio  # noqa: F401
    from dmdserve.v1 import dmdserve_pb2, dmdserve_pb2_grpc
    from grpc_health_v1 import health_pb2, health_pb2_grpc
    return grpc, dmdserve_pb2, dmdserve_pb2_grpc, health_pb2, health_pb2_grpc


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default="build")
    parser.add_argument("--bundle", default="models/fashion-dmd", help="the healthy model")
    parser.add_argument("--faulty_source", default="models/tiny-random",
                        help="bundle the faulty models are copied from")
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--load_factor", type=float, default=2.0,
                        help="offered images/s as a multiple of the measured capacity")
    parser.add_argument("--capacity_s", type=float, default=5)
    parser.add_argument("--capacity_concurrency", type=int, default=16)
    parser.add_argument("--warmup_s", type=float, default=None,
                        help="load seconds before resource growth counts; default 20%% of the "
                             "load, at most 60")
    parser.add_argument("--rss_growth_mib", type=float, default=64,
                        help="largest RSS growth after warm-up (end of load minus steady state)")
    parser.add_argument("--rss_slope_mib_per_min", type=float, default=4,
                        help="largest RSS trend after warm-up (checked when the load after "
                             "warm-up lasts 2 minutes or more)")
    parser.add_argument("--fd_growth", type=float, default=16)
    parser.add_argument("--thread_growth", type=float, default=8)
    parser.add_argument("--max_launch_lag_s", type=float, default=1.0,
                        help="fail unless the client sent 99%% of its requests within this "
                             "many seconds of their scheduled times (it kept up)")
    parser.add_argument("--drain_requests", type=int, default=9,
                        help="gRPC requests in the drain burst, beside DRAIN_HTTP's 6 HTTP ones: "
                             "15 of 16 images fit the default 256-image queue")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json_out")
    parser.add_argument("--log_out", help="write the server's log here")
    parser.add_argument("server_flags", nargs="*")
    return parser.parse_args()


def main():
    args = parse_args()
    stubs = import_stubs(args.build)
    with tempfile.TemporaryDirectory(prefix="dmdserve-soak-") as tmp:
        try:
            report = asyncio.run(run(args, stubs, tmp))
        except SetupError as e:
            print(f"soak: could not run: {e}", file=sys.stderr)
            return 2
    print(sr.markdown(report))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if report["failures"] else 0


async def run(args, stubs, tmp):
    """One soak run; returns the report (soak_report.markdown's input)."""
    grpc, pb, pb_grpc, health_pb2, health_grpc = stubs
    fault_dirs, trigger_id = make_faulty_bundles(tmp, args.faulty_source)
    with open(os.path.join(args.bundle, "model.json")) as f:
        healthy = json.load(f)["name"]
    models = [healthy, "faulty", "oom"]
    server = DmdserveProcess(os.path.join(args.build, "server", "dmdserve"),
                             [args.bundle, *fault_dirs], args.server_flags, log_path=args.log_out)
    try:
        server.wait_ready(300)
    except RuntimeError as e:
        server.stop(signal.SIGKILL)
        raise SetupError(str(e)) from None
    try:
        return await soak(args, stubs, server, healthy, models, trigger_id, tmp)
    finally:
        if server.proc.poll() is None:
            server.stop(signal.SIGKILL)


async def soak(args, stubs, server, healthy, models, trigger_id, tmp):
    grpc, pb, pb_grpc, health_pb2, health_grpc = stubs
    loop = asyncio.get_running_loop()
    checks, failures = [], []

    def check(name, ok, why=()):
        checks.append((name, bool(ok)))
        if not ok:
            failures.extend(why or [name])

    t0 = time.monotonic()
    sampler = Sampler(server.proc.pid, t0)
    sampler.start()
    capacity = await loop.run_in_executor(
        None, measure_capacity, args, server.target,
        write_prompts(os.path.join(tmp, "prompts.txt")))
    if not capacity["images_per_second"]:
        raise SetupError(f"capacity measurement failed: {capacity}")
    target = args.load_factor * capacity["images_per_second"]
    ledger = sr.Ledger()
    max_prompt_bytes = flag_value(args.server_flags, "max_prompt_bytes", 4096)
    load = Load(grpc, pb, pb_grpc, health_pb2, health_grpc, server.target, healthy, ledger,
                random.Random(args.seed), max_prompt_bytes,
                lambda prompt: sh.HttpClients(
                    "127.0.0.1", server.http_port, healthy, random.Random(args.seed + 1), prompt,
                    flag_value(args.server_flags, "http_max_body_bytes", 64 << 10),
                    max_prompt_bytes, long_holds=args.minutes * 60 >= 120))
    info = {m.name: m for m in (await load.stub.ListModels(pb.ListModelsRequest(),
                                                           timeout=30)).models}
    load.max_images = info[healthy].max_images_per_request
    ids = (await load.stub.Tokenize(pb.TokenizeRequest(model="faulty", text=TRIGGER_WORD),
                                    timeout=30)).ids
    if list(ids) != [trigger_id]:
        raise SetupError(f"'{TRIGGER_WORD}' tokenizes to {list(ids)}, not [{trigger_id}]")

    duration = args.minutes * 60
    warmup = args.warmup_s if args.warmup_s is not None else min(60.0, 0.2 * duration)
    before_text = metrics_text(server.metrics_port)
    scraper = Scraper(f"http://127.0.0.1:{server.metrics_port}/metrics")
    scraper.start()
    load_start = time.monotonic() - t0
    await load.drive(load_rates(target), duration)
    load_end = time.monotonic() - t0
    await asyncio.gather(load.settle(), loop.run_in_executor(None, scraper.stop))
    idle, _ = await loop.run_in_executor(None, wait_idle, server.metrics_port, models)
    # Requests whose clients went away without reading their answer are counted once the server
    # notices: read the counts after it had time to.
    await asyncio.sleep(3)
    after_text = await loop.run_in_executor(None, metrics_text, server.metrics_port)
    resources_after = dict(sampler.samples[-1])

    # The ledger and the server's counts.
    check("every request ended with a final status", not ledger.open,
          [f for f in sr.check_ledger(ledger) if f.startswith("lost")])
    unexpected = [f for f in sr.check_ledger(ledger) if f.startswith("unexpected")]
    check("every status is one its kind allows", not unexpected, unexpected)
    client = sr.client_counts(ledger, lambda kind: {
        "fault_raise": "faulty", "fault_oom": "oom"}.get(kind, healthy))
    server_counts = sr.delta(sr.parse_requests_total(after_text),
                             sr.parse_requests_total(before_text))
    mismatches = sr.check_metrics(client, server_counts, ("faulty", "oom"))
    check("dmdserve_requests_total agrees with the client's counts", not mismatches, mismatches)
    check("no request in flight and no image queued after the load", idle)
    check("/metrics answered every scrape during the load", not scraper.failed,
          [f"/metrics scrape failed: {e}" for e in scraper.failed[:5]])
    by_kind = ledger.by_kind()
    seen = {"fault_raise": "INTERNAL", "fault_oom": sr.OUT_OF_MEMORY}
    check("every fault and bad input was injected and answered",
          all(by_kind.get(k, {}).get(v) for k, v in seen.items())
          and all(by_kind.get(sr.BAD_PREFIX + case) for case, *_ in load.bad + load.http.bad))
    held = load.http.held_at_start
    check("hostile HTTP clients were held open while the normal HTTP requests ran "
          "(at least one at the median request's start)",
          held and sr.percentile(held, 0.5) >= 1,
          [f"stall isolation: hostile HTTP clients held at the normal HTTP requests' starts: "
           f"median {sr.percentile(held, 0.5)}; the check did not test what it claims"])
    http_ok = [s for k in sr.HTTP_NORMAL_KINDS for s in ledger.latency_ok[k]]
    grpc_ok = [s for k in sr.GRPC_NORMAL_KINDS for s in ledger.latency_ok[k]]
    stall = sr.check_stall_isolation(http_ok, grpc_ok)
    check("stalled HTTP clients delay no one: HTTP p99 <= max(3 x gRPC p99, gRPC p99 + 1 s)",
          not stall, stall)
    offered = sum(ledger.images_sent[k] for k in sr.LOAD_KINDS) / duration
    lag = sr.percentile(load.lags, 0.99)
    check(f"the client kept up: 99% of requests sent within {args.max_launch_lag_s:g} s of "
          f"their scheduled times", lag is not None and lag <= args.max_launch_lag_s,
          [f"launch lag p99 {_seconds(lag)} (limit {args.max_launch_lag_s:g} s): the client could not "
           f"keep up, so the run did not offer the load it claims"])

    # Resources after warm-up.
    window = min(10.0, max(1.0, (load_end - load_start - warmup) / 3))
    resources = sr.growth_summary(sampler.samples, load_start, load_start + warmup, load_end,
                                  window)
    limits = {"rss_mib": args.rss_growth_mib, "fds_beyond_clients": args.fd_growth,
              "threads": args.thread_growth}
    growth = sr.check_growth(resources, limits)
    check(f"no growth after warm-up beyond {args.rss_growth_mib:g} MiB RSS, "
          f"{args.fd_growth:g} fds (beyond the client's connections), "
          f"{args.thread_growth:g} threads", not growth, growth)
    slope = resources["rss_mib"]["slope_per_min"]
    if load_end - load_start - warmup >= 120:  # shorter, and the slope is mostly noise
        check(f"RSS trend after warm-up at most {args.rss_slope_mib_per_min:g} MiB/min",
              slope <= args.rss_slope_mib_per_min,
              [f"resources: RSS grew {slope:.1f} MiB/min after warm-up (least squares); the "
               f"limit is {args.rss_slope_mib_per_min:g}"])
    fds_before = resources["fds_beyond_clients"]["start"]
    fds_after = resources_after["fds_beyond_clients"]
    check(f"open fds (beyond the client's connections) after the load within "
          f"{args.fd_growth:g} of before it",
          fds_before is not None and fds_after - fds_before <= args.fd_growth,
          [f"open fds beyond the client's connections: {fds_before} before the load, "
           f"{fds_after} after it"])

    # Still healthy, then a drain with work in flight.
    await after_load_checks(load, models, checks)
    failures.extend(name for name, ok in checks[-len(models) - 1:] if not ok)
    images = min(16, load.max_images)
    unfinished, results, http_results, after = await drain_burst(
        load, server, args.drain_requests, images)
    bad = [r for r in results if isinstance(r, BaseException) or len(r.images) != images]
    bad += [r for r in http_results if isinstance(r, BaseException)
            or r[:2] != ("HTTP 200", images)]
    http_drain = len(http_results)
    check(f"SIGTERM with {args.drain_requests} gRPC and {http_drain} HTTP requests accepted "
          f"({unfinished} unfinished): every one OK (HTTP: 200 with every image)", not bad,
          [f"drain: {len(bad)} request(s) failed, e.g. {bad[0]!r}"] if bad else ())
    check(f"new HTTP requests after SIGTERM ({len(after)}) get 503",
          all(label == "HTTP 503" for label in after),
          [f"drain: new HTTP requests after SIGTERM got {after}"])
    await load.close()
    code = await loop.run_in_executor(None, lambda: server.stop(timeout_s=120))
    check("exit code 0 after SIGTERM", code == 0, [f"exit code {code} after SIGTERM"])
    sampler.stop()

    load_ok = {k: ledger.latency_ok[k] for k in sr.LOAD_KINDS if ledger.latency_ok[k]}
    return {
        "minutes": args.minutes, "load_factor": args.load_factor, "machine": machine_line(),
        "commit": git_commit(), "date": today(), "bundle": args.bundle,
        "server_flags": args.server_flags, "capacity": capacity,
        "target_images_per_second": target, "offered_images_per_second": offered,
        "launch_lag_p99_s": lag,
        "offered_requests_per_second": sum(ledger.sent[k] for k in sr.LOAD_KINDS) / duration,
        "served_images_per_second": sum(ledger.images_ok[k] for k in sr.LOAD_KINDS) / duration,
        "server_images_generated": sr.metric_sum(after_text, "dmdserve_images_generated_total",
                                                 model=healthy)
        - sr.metric_sum(before_text, "dmdserve_images_generated_total", model=healthy),
        "requests_sent": sum(ledger.sent.values()),
        "p99_ok": {"grpc": sr.percentile(grpc_ok, 0.99), "http": sr.percentile(http_ok, 0.99)},
        "hostile_http_held_median": sr.percentile(held, 0.5) if held else None, "requests_lost": len(ledger.open),
        "scrapes": scraper.ok, "by_kind": by_kind,
        "latency_ok": {k: {q: sr.percentile(v, float(q[1:]) / 100) for q in ("p50", "p90", "p99")}
                       for k, v in load_ok.items()},
        "load_window": [load_start, load_end], "warmup_s": warmup, "resources": resources, "resources_after": resources_after,
        "samples": sampler.samples, "server_counts": {"/".join(k): v for k, v in
                                                      sorted(server_counts.items())},
        "drain": {"requests": args.drain_requests, "http_requests": http_drain,
                  "after_sigterm_http": after, "images_each": images,
                  "unfinished_at_sigterm": unfinished, "exit_code": code},
        "checks": checks, "failures": failures,
    }


if __name__ == "__main__":
    sys.exit(main())
