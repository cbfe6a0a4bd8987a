"""Shared helpers for the integration tests: start the real dmdserve on free ports, talk to it.

Environment (set by CTest, see tests/CMakeLists.txt): DMDSERVE_BIN, DMDCTL_BIN,
DMDSERVE_SOURCE_DIR, DMDSERVE_BUILD_DIR, PYTHONPATH with the generated stubs.
"""
import io
import os
import re
import signal
import subprocess
import threading
import time
import unittest
import urllib.request

import grpc
from PIL import Image

from dmdserve.v1 import dmdserve_pb2 as pb
from dmdserve.v1 import dmdserve_pb2_grpc as pb_grpc
from grpc_health_v1 import health_pb2, health_pb2_grpc

SOURCE_DIR = os.environ["DMDSERVE_SOURCE_DIR"]
BUILD_DIR = os.environ["DMDSERVE_BUILD_DIR"]
DMDSERVE_BIN = os.environ["DMDSERVE_BIN"]
DMDCTL_BIN = os.environ["DMDCTL_BIN"]
TINY_BUNDLE = os.path.join(SOURCE_DIR, "models", "tiny-random")

_READY_LINE = re.compile(r"serving port=(\d+) metrics_port=(\d+)")


class Server:
    """A dmdserve process on loopback with free ports; its log is collected in `lines`."""

    def __init__(self, *flags, model_dirs=(TINY_BUNDLE,), wait_ready=True, timeout_s=120,
                 env=None):
        args = [DMDSERVE_BIN, "--listen_host=127.0.0.1", "--port=0", "--metrics_port=0",
                "--model_dirs=" + ",".join(model_dirs), *flags]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1, env={**os.environ, **(env or {})})
        self.lines = []
        self.port = None
        self.metrics_port = None
        self._ready = threading.Event()
        self._ready_seen = False
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.channel = None
        if wait_ready:
            self.wait_ready(timeout_s)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = re.search(r"gRPC listening on [^:]+:(\d+), /metrics on [^:]+:(\d+)", line)
            if m:
                self.port, self.metrics_port = int(m.group(1)), int(m.group(2))
                self._listening.set()
            if _READY_LINE.search(line):
                self._ready_seen = True
                self._ready.set()
        self._ready.set()  # the server's output ended: wake the waiters (it is not ready)
        self._listening.set()

    def wait_listening(self, timeout_s=120):
        if not self._listening.wait(timeout_s) or self.port is None:
            raise RuntimeError("dmdserve did not start listening:\n" + self.log())
        self._connect()

    def wait_ready(self, timeout_s=120):
        # The output can end before the exited process is reaped: the ready line decides.
        if not self._ready.wait(timeout_s) or not self._ready_seen or self.proc.poll() is not None:
            raise RuntimeError("dmdserve did not become ready:\n" + self.log())
        self._connect()

    def _connect(self):
        if self.channel is None:
            self.channel = grpc.insecure_channel(
                f"127.0.0.1:{self.port}",
                options=[("grpc.max_receive_message_length", 256 << 20)])
            self.stub = pb_grpc.ImageGenerationStub(self.channel)
            self.health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def target(self):
        return f"127.0.0.1:{self.port}"

    def log(self):
        return "\n".join(self.lines[-200:])

    def metrics(self):
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    def health_status(self, service=""):
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

    def terminate(self, sig=signal.SIGTERM):
        """Sends a stop signal (the server starts draining) without waiting."""
        self._signalled = True
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout_s=60, again=False):
        """Stops the server and returns its exit code. Sends `sig` unless a stop signal was sent
        already (a second one makes dmdserve exit at once); again=True sends it regardless."""
        if self.proc.poll() is None and (again or not getattr(self, "_signalled", False)):
            self.terminate(sig)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.close()
        return code

    def close(self):
        """Releases the log pipe and the channel once the process has exited."""
        self._reader.join(10)
        self.proc.stdout.close()
        if self.channel is not None:
            self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.stop()


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
