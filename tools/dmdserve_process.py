"""One running dmdserve on free loopback ports, with its log followed in a thread.

The launcher shared by the integration tests (tests/integration/harness.py), the served
evaluation (training/evaluate_served.py) and the service benchmark (scripts/bench/bench_service.py).

    with DmdserveProcess("build/server/dmdserve", ["models/fashion-dmd"]) as server:
        server.wait_ready()
        ... dmdctl --target=server.target ...

Thread safety: one thread drives a DmdserveProcess; the log reader appends to `lines` from its
own thread (reading `lines` while the server runs is safe, as list appends are atomic).
"""
import os
import re
import signal
import subprocess
import threading

LISTENING_LINE = re.compile(r"gRPC listening on [^:]+:(\d+), /metrics on [^:]+:(\d+)"
                            r"(?:, HTTP API on (?:\S+:(\d+)|off))?")
READY_LINE = re.compile(r"serving port=\d+ metrics_port=\d+")


class DmdserveProcess:
    """Starts `binary` with --port=0 --metrics_port=0 --http_port=0 on 127.0.0.1 serving
    `model_dirs`, plus `flags`. Every line the server prints (stdout and stderr) is kept in
    `lines` and, when `log_path` is given, written there as it arrives. `env` entries are added
    to the environment. The constructor does not wait: call wait_listening() or wait_ready()."""

    def __init__(self, binary, model_dirs, flags=(), env=None, log_path=None):
        args = [binary, "--listen_host=127.0.0.1", "--port=0", "--metrics_port=0",
                "--http_port=0", "--model_dirs=" + ",".join(model_dirs), *flags]
        self._log_file = open(log_path, "w", buffering=1) if log_path else None
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1, env={**os.environ, **(env or {})})
        self.lines = []
        self.port = None
        self.metrics_port = None
        self.http_port = None  # None until listening, and when the HTTP API is off
        self._signalled = False
        self._ready = threading.Event()
        self._ready_seen = False
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if self._log_file is not None:
                self._log_file.write(line + "\n")
            m = LISTENING_LINE.search(line)
            if m:
                self.port, self.metrics_port = int(m.group(1)), int(m.group(2))
                if m.group(3):
                    self.http_port = int(m.group(3))
                self._listening.set()
            m = READY_LINE.search(line)
            if m:  # the ports were read from the listening line, which comes first
                self._ready_seen = True
                self._ready.set()
        self._ready.set()  # the server's output ended: wake the waiters (it is not ready)
        self._listening.set()

    def wait_listening(self, timeout_s=120):
        """Returns once the ports are bound (models may still be loading); raises RuntimeError
        with the log if the server exits first or `timeout_s` passes."""
        if not self._listening.wait(timeout_s) or self.port is None:
            raise RuntimeError("dmdserve did not start listening:\n" + self.log())

    def wait_ready(self, timeout_s=120):
        """Returns once the server printed its ready line (every model loaded and warmed up);
        raises RuntimeError with the log if it exits first or `timeout_s` passes."""
        # The output can end before the exited process is reaped: the ready line decides.
        if not self._ready.wait(timeout_s) or not self._ready_seen or self.proc.poll() is not None:
            raise RuntimeError("dmdserve did not become ready:\n" + self.log())

    @property
    def target(self):
        """host:port of the gRPC API."""
        return f"127.0.0.1:{self.port}"

    def log(self, last=200):
        """The last `last` lines of the server's output."""
        return "\n".join(self.lines[-last:])

    def terminate(self, sig=signal.SIGTERM):
        """Sends a stop signal (the server starts draining) without waiting."""
        self._signalled = True
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout_s=60, again=False):
        """Stops the server and returns its exit code. Sends `sig` unless a stop signal was sent
        already (a second one makes dmdserve exit at once); again=True sends it regardless.
        Kills the server and re-raises if it has not exited after `timeout_s`."""
        if self.proc.poll() is None and (again or not self._signalled):
            self.terminate(sig)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.close()
        return code

    def close(self):
        """Releases the log pipe and the log file once the process has exited."""
        self._reader.join(10)
        self.proc.stdout.close()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.stop()
