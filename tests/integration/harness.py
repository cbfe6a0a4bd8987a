"""Shared helpers for the integration tests: start the real dmdserve on free ports, talk to it.

Environment (set by CTest, see tests/CMakeLists.txt): DMDSERVE_BIN, DMDCTL_BIN,
DMDSERVE_SOURCE_DIR, DMDSERVE_BUILD_DIR, PYTHONPATH with the generated stubs.
"""
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
import unittest
import urllib.request

import grpc
from PIL import Image

from dmdserve.v1 import dmdserve_pb2 as pb
from dmdserve.v1 import dmdserve_pb2_grpc as pb_grpc
from grpc_health_v1 import health_pb2, health_pb2_grpc

SOURCE_DIR = os.environ["DMDSERVE_SOURCE_DIR"]
sys.path.insert(0, SOURCE_DIR)
from tools.dmdserve_process import DmdserveProcess  # noqa: E402

BUILD_DIR = os.environ["DMDSERVE_BUILD_DIR"]
DMDSERVE_BIN = os.environ["DMDSERVE_BIN"]
DMDCTL_BIN = os.environ["DMDCTL_BIN"]
TINY_BUNDLE = os.path.join(SOURCE_DIR, "models", "tiny-random")


class Server(DmdserveProcess):
    """dmdserve on loopback with free ports (tiny-random by default), waited for unless
    wait_ready=False, with a gRPC channel once it listens; its log is collected in `lines`."""

    def __init__(self, *flags, model_dirs=(TINY_BUNDLE,), wait_ready=True, timeout_s=120,
                 env=None):
        super().__init__(DMDSERVE_BIN, model_dirs, flags, env=env)
        self.channel = None
        if wait_ready:
            try:
                self.wait_ready(timeout_s)
            except BaseException:
                # The caller never gets this object to stop it: no server outlives the failure.
                self.proc.kill()
                self.proc.wait()
                self.close()
                raise

    def wait_listening(self, timeout_s=120):
        super().wait_listening(timeout_s)
        self._connect()

    def wait_ready(self, timeout_s=120):
        super().wait_ready(timeout_s)
        self._connect()

    def _connect(self):
        if self.channel is None:
            self.channel = grpc.insecure_channel(
                self.target, options=[("grpc.max_receive_message_length", 256 << 20)])
            self.stub = pb_grpc.ImageGenerationStub(self.channel)
            self.health = health_pb2_grpc.HealthStub(self.channel)

    def metrics(self):
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    def health_status(self, service=""):
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

    def close(self):
        """Releases the log pipe and the channel once the process has exited."""
        super().close()
        if self.channel is not None:
            self.channel.close()


def metric_value(text, name, **labels):
    """The value of one sample of the Prometheus text exposition; None when absent."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(found.get(k) == str(v) for k, v in labels.items()):
            return float(m.group(4))
    return None


def decode_png(data):
    """(width, height, mode, pixel bytes) of a PNG."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.width, image.height, image.mode, image.tobytes()


def make_slow_bundle(directory, name, **manifest):
    """tiny-random under `name` in `directory`, with the teacher's 50-step guided schedule (100
    generator calls an image), so that a request takes long enough for a test to act while it is in
    flight; `manifest` overrides more fields of model.json. Returns the bundle's path."""
    bundle = os.path.join(directory, name)
    os.makedirs(bundle)
    for entry in os.listdir(TINY_BUNDLE):
        if entry != "model.json":
            os.symlink(os.path.join(TINY_BUNDLE, entry), os.path.join(bundle, entry))
    with open(os.path.join(TINY_BUNDLE, "model.json")) as f:
        tiny = json.load(f)
    with open(os.path.join(SOURCE_DIR, "models", "fashion-teacher", "model.json")) as f:
        teacher = json.load(f)
    tiny.update(name=name, schedule=teacher["schedule"], guidance_scale=3.0, **manifest)
    with open(os.path.join(bundle, "model.json"), "w") as f:
        json.dump(tiny, f)
    return bundle


def api_key_line(name, secret, rate=None):
    """One line of an --api_keys_file: NAME, the SHA-256 of `secret`, and the optional rate limit
    in images per second."""
    digest = hashlib.sha256(secret.encode()).hexdigest()
    return f"{name} {digest}" + (f" {rate}" if rate is not None else "") + "\n"


def write_api_keys(directory, keys):
    """Writes an --api_keys_file of `keys` (name -> (secret, images per second or None)) into
    `directory` and returns its path."""
    path = os.path.join(directory, "api_keys")
    with open(path, "w") as f:
        f.writelines(api_key_line(name, secret, rate) for name, (secret, rate) in keys.items())
    return path


def wait_until(predicate, timeout_s=30, interval_s=0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def run_dmdctl(*args, target, check=False, timeout_s=120):
    return subprocess.run([DMDCTL_BIN, f"--target={target}", *args], capture_output=True,
                          text=True, timeout=timeout_s, check=check)


class SharedServerTestCase(unittest.TestCase):
    """Test case whose tests share one server, started with `server_flags` and required to drain
    and exit 0 at the end."""

    server_flags = ()

    @classmethod
    def setUpClass(cls):
        cls.server = Server(*cls.server_flags)

    @classmethod
    def tearDownClass(cls):
        assert cls.server.stop() == 0, cls.server.log()
