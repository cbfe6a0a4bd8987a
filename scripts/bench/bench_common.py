"""Helpers shared by the benchmark scripts of scripts/bench/: the raw pipeline benchmark, one
`dmdctl bench` run, dmdserve's batch counters, the benchmark prompts and the machine facts.

Import from a script in scripts/bench/ with `from bench_common import ...` (its own directory is
on sys.path when it runs); `REPO` is the repository root, already put on sys.path so that
`tools.*` imports work too.
"""
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


# glibc malloc set as dmdserve sets it at start-up (worker/malloc_tuning.h, --malloc_tuning on by
# default), for processes that do not set it themselves (pipeline_benchmark).
DMDSERVE_MALLOC_TUNABLES = {
    "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"}


def raw_pipeline(build, bundle, repetitions, flags, env=None):
    """{batch size: images/s} from BUILD/worker/pipeline_benchmark (median of the repetitions),
    in-process Pipeline::Run at each of the bundle's batch sizes; `flags` go to the benchmark,
    `env` entries are added to its environment."""
    out = subprocess.run(
        [os.path.join(build, "worker", "pipeline_benchmark"), f"--bundle={bundle}",
         "--benchmark_format=json", f"--benchmark_repetitions={repetitions}",
         "--benchmark_report_aggregates_only=true", *flags],
        capture_output=True, text=True, check=True, env={**os.environ, **(env or {})})
    rates = {}
    for b in json.loads(out.stdout)["benchmarks"]:
        if b.get("aggregate_name", "median") != "median":  # a single repetition has no median
            continue
        batch = int(re.search(r"batch:(\d+)", b["name"]).group(1))
        rates[batch] = b["images_per_second"] if "images_per_second" in b else b["items_per_second"]
    return rates


def raw_at(raw, batch):
    """Raw images/s at a (fractional) batch size, interpolated linearly between measured sizes."""
    sizes = sorted(raw)
    if batch <= sizes[0]:
        return raw[sizes[0]]
    for lo, hi in zip(sizes, sizes[1:]):
        if batch <= hi:
            return raw[lo] + (raw[hi] - raw[lo]) * (batch - lo) / (hi - lo)
    return raw[sizes[-1]]


def batch_totals(metrics_port):
    """(batches run, images in them, seconds the batches took) so far, from dmdserve's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()

    def total(name):
        return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)", text, re.M))
    return (total("dmdserve_batch_size_images_count"), total("dmdserve_batch_size_images_sum"),
            total("dmdserve_batch_duration_seconds_sum"))


def write_prompts(path, count=20000):
    """Writes `count` distinct prompts, one a line, and returns `path`. Distinct prompts, like the
    raw benchmark's batches: the pipeline encodes identical prompts of a batch once, so repeated
    prompts would flatter a service."""
    with open(path, "w") as f:
        for i in range(count):
            f.write(f"a photo of item {i} in the catalogue\n")
    return path


def dmdctl_bench(build, target, concurrency, duration_s, num_images=1, prompts_file=None,
                 check=False):
    """The JSON report of `dmdctl bench` against target (host:port): PNG images, `num_images`
    per request, `concurrency` request threads for `duration_s` seconds. check=True raises when
    a request failed (dmdctl exits 1)."""
    command = [os.path.join(build, "client", "dmdctl"), f"--target={target}", "bench",
               f"--concurrency={concurrency}", f"--duration_s={duration_s}",
               f"--num_images={num_images}", "--json"]
    if prompts_file:
        command.append(f"--prompts_file={prompts_file}")
    out = subprocess.run(command, capture_output=True, text=True, check=check)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"dmdctl bench failed ({out.returncode}): {out.stderr}") from None


def git_commit():
    """HEAD of the repository, with "-dirty" when the tree has changes; "" outside git."""
    def git(*a):
        return subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True).stdout
    head = git("rev-parse", "--short=12", "HEAD").strip()
    return head + ("-dirty" if head and git("status", "--porcelain").strip() else "")


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores():
    """Cores this process may run on (its affinity mask), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_line():
    """One line: architecture, usable cores, platform (the head of every report)."""
    return f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"


def today():
    return time.strftime("%Y-%m-%d")


class PeerProcess:
    """scripts/bench/python_peer.py serving `bundle` on a free loopback port, started with
    `flags` (e.g. --max_batch_size=1), `env` entries added to its environment; its stubs are
    BUILD/tests/python_gen. `lines` keeps its output (a reader thread appends). One thread
    drives a PeerProcess."""

    LISTENING = re.compile(r"python_peer listening on [^:]+:(\d+)")
    BATCHES = re.compile(r"python_peer batches (\{.*\})")

    def __init__(self, build, bundle, flags=(), env=None):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "scripts", "bench", "python_peer.py"),
             f"--bundle={bundle}", f"--build={build}", "--port=0", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, **(env or {})})
        self.lines, self.port = [], None
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                m = self.LISTENING.search(line)
                if m:
                    self.port = int(m.group(1))
                self._cv.notify_all()
        with self._cv:
            self.lines.append("(exited)")
            self._cv.notify_all()

    def wait_ready(self, timeout_s=120):
        """Returns once the peer listens (model loaded and warmed up); raises RuntimeError with
        its output if it exits first or `timeout_s` passes."""
        with self._cv:
            if not self._cv.wait_for(lambda: self.port or "(exited)" in self.lines, timeout_s) \
                    or not self.port:
                raise RuntimeError("python_peer did not start:\n" + "\n".join(self.lines[-50:]))

    @property
    def target(self):
        """host:port of the gRPC API."""
        return f"127.0.0.1:{self.port}"

    def batch_totals(self):
        """(batches run, images in them, seconds in the model) so far: asks the peer with
        SIGUSR1; None if it does not answer."""
        with self._cv:
            seen = len(self.lines)
            self.proc.send_signal(signal.SIGUSR1)
            self._cv.wait_for(lambda: any(self.BATCHES.search(x) for x in self.lines[seen:]), 10)
            for line in self.lines[seen:]:
                m = self.BATCHES.search(line)
                if m:
                    counts = json.loads(m.group(1))
                    return counts["batches"], counts["images"], counts["model_seconds"]
        return None

    def stop(self):
        """Stops the peer (SIGTERM, then SIGKILL after 30 s) and returns its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        code = self.proc.wait()
        self._reader.join(10)
        self.proc.stdout.close()
        return code
