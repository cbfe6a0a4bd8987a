"""Server lifecycle against the real binary: health transitions, /metrics (promtool-clean),
back-pressure under a burst, and draining on SIGTERM."""
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest

import grpc

from harness import (DMDSERVE_BIN, Server, health_pb2, make_slow_bundle, metric_value, pb,
                     wait_until)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE = "dmdserve.v1.ImageGeneration"


def _child_pids():
    """Process ids of this process's living (or unreaped) children."""
    pids = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            pids.update(int(p) for p in f.read().split())
    return pids


class HarnessTest(unittest.TestCase):
    def test_a_server_not_ready_in_time_is_not_left_running(self):
        before = _child_pids()
        # Many warm-up passes: the server is still warming up when the wait gives up.
        with self.assertRaises(RuntimeError):
            Server("--warmup_runs=300", timeout_s=0.5)
        self.assertEqual(_child_pids(), before)


class HealthTest(unittest.TestCase):
    def test_not_serving_while_warming_up_then_serving(self):
        # Many warm-up passes keep the server in warm-up long enough to observe it.
        with Server("--warmup_runs=300", wait_ready=False) as server:
            server.wait_listening()
            self.assertEqual(server.health_status(), NOT_SERVING)
            self.assertEqual(server.health_status(SERVICE), NOT_SERVING)
            with self.assertRaises(grpc.RpcError) as ctx:
                server.stub.Generate(pb.GenerateRequest(prompt="x"), timeout=30)
            self.assertEqual(ctx.exception.code(), grpc.StatusCode.UNAVAILABLE)
            self.assertIn("not ready", ctx.exception.details())
            models = server.stub.ListModels(pb.ListModelsRequest(), timeout=10).models
            self.assertFalse(models[0].ready)
            self.assertEqual(metric_value(server.metrics(), "dmdserve_model_ready",
                                          model="tiny-random"), 0)
            server.wait_ready()
            self.assertEqual(server.health_status(), SERVING)
            self.assertEqual(server.health_status(SERVICE), SERVING)
            self.assertEqual(metric_value(server.metrics(), "dmdserve_model_ready",
                                          model="tiny-random"), 1)
            self.assertEqual(server.stop(), 0)

    def test_a_stop_signal_while_starting_exits_at_once(self):
        # 300 warm-up passes keep the server starting for seconds: the signal must end it there,
        # before it serves.
        server = Server("--warmup_runs=300", wait_ready=False)
        try:
            server.wait_listening()
            self.assertEqual(server.health_status(), NOT_SERVING)
            self.assertEqual(server.stop(timeout_s=20), 0, server.log())
        except BaseException:
            server.stop(signal.SIGKILL)
            raise
        self.assertIn("received SIGTERM while starting: exiting before serving", server.log())
        self.assertNotIn("ready: serving", server.log())

    def test_watch_sees_not_serving_as_soon_as_draining_starts(self):
        server = Server()
        updates = []
        stream = server.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)

        def read():
            try:
                for update in stream:
                    updates.append(update.status)
            except grpc.RpcError:
                pass

        reader = threading.Thread(target=read)
        reader.start()
        self.assertTrue(wait_until(lambda: SERVING in updates))
        self.assertEqual(server.stop(signal.SIGTERM), 0, server.log())
        reader.join(30)
        self.assertEqual(updates[0], SERVING)
        self.assertIn(NOT_SERVING, updates)


class ConfigTest(unittest.TestCase):
    def test_environment_sets_flags_the_command_line_wins_and_json_logs_parse(self):
        env = {"DMDSERVE_LOG_FORMAT": "json", "DMDSERVE_MAX_PROMPT_BYTES": "10",
               "DMDSERVE_MAX_QUEUE_IMAGES": "20"}
        with Server(env=env) as server:
            with self.assertRaises(grpc.RpcError) as ctx:
                server.stub.Generate(pb.GenerateRequest(prompt="x" * 11), timeout=30)
            self.assertIn("the limit is 10", ctx.exception.details())
            server.stub.Generate(pb.GenerateRequest(prompt="x" * 10), timeout=30)
            self.assertEqual(server.stop(), 0)
        for line in server.lines:
            record = json.loads(line)  # every line is one JSON object
            self.assertEqual(set(record), {"time", "level", "thread", "message"})
        messages = [json.loads(line)["message"] for line in server.lines]
        self.assertTrue(any('error="prompt is 11 bytes' in m for m in messages), messages)
        self.assertTrue(any("rpc=Generate" in m and "code=OK" in m for m in messages))

        with Server("--max_prompt_bytes=20", env=env) as server:
            server.stub.Generate(pb.GenerateRequest(prompt="x" * 15), timeout=30)

    def test_help_documents_every_server_flag(self):
        out = subprocess.run([DMDSERVE_BIN, "--help"], capture_output=True, text=True, timeout=30)
        text = out.stdout + out.stderr
        self.assertIn("DMDSERVE_<FLAG>", text)
        for flag in ("port", "metrics_port", "http_port", "http_model_aliases", "model_dirs",
                     "default_model", "workers", "max_batch_size", "max_queue_delay_us",
                     "max_queue_images", "device",
                     "drain_grace_s", "reflection", "log_format"):
            self.assertIn(f"--{flag} (", text)

    def test_bad_flags_and_bundles_are_fatal_at_startup_with_a_clear_message(self):
        cases = [
            (["--log_format=xml"], "--log_format must be text or json"),
            (["--model_dirs=/nonexistent"], "/nonexistent"),
            (["--workers=-1"], "instances_per_device must be >= 0"),
            (["--instances_per_device=-2"], "--instances_per_device must be >= 0"),
            (["--png_compression_level=12"], "png_compression_level must be in 0..9"),
            (["--default_model=nope"], "default_model 'nope'"),
        ]
        for flags, text in cases:
            with self.subTest(flags=flags):
                server = Server(*flags, wait_ready=False)
                code = server.proc.wait(60)
                server.close()
                self.assertEqual(code, 1)
                self.assertIn(text, server.log())


class MetricsTest(unittest.TestCase):
    def test_metrics_are_promtool_clean_and_count_traffic(self):
        with Server() as server:
            server.stub.Generate(pb.GenerateRequest(prompt="a bag", num_images=3, seed=1),
                                 timeout=60)
            list(server.stub.GenerateStream(pb.GenerateRequest(prompt="a bag", num_images=2),
                                            timeout=60))
            server.stub.Tokenize(pb.TokenizeRequest(text="a bag"), timeout=10)
            text = server.metrics()
            promtool = shutil.which("promtool")
            self.assertIsNotNone(promtool, "promtool (Debian package prometheus) is required")
            check = subprocess.run([promtool, "check", "metrics"], input=text,
                                   capture_output=True, text=True)
            self.assertEqual(check.returncode, 0, check.stdout + check.stderr)

            def value(name, **labels):
                return metric_value(text, name, **labels)

            self.assertEqual(value("dmdserve_requests_total", model="tiny-random",
                                   method="Generate", code="OK"), 1)
            self.assertEqual(value("dmdserve_requests_total", model="tiny-random",
                                   method="GenerateStream", code="OK"), 1)
            self.assertEqual(value("dmdserve_requests_total", model="tiny-random",
                                   method="Tokenize", code="OK"), 1)
            self.assertEqual(value("dmdserve_images_generated_total", model="tiny-random"), 5)
            self.assertEqual(value("dmdserve_request_duration_seconds_count", model="tiny-random",
                                   method="Generate"), 1)
            self.assertEqual(value("dmdserve_queue_wait_seconds_count", model="tiny-random"), 2)
            self.assertEqual(value("dmdserve_stage_duration_seconds_count", model="tiny-random",
                                   stage="png_encode"), 5)
            for stage in ("text_encoder", "generator", "decoder"):
                self.assertGreaterEqual(value("dmdserve_stage_duration_seconds_count",
                                              model="tiny-random", stage=stage), 1)
            self.assertEqual(value("dmdserve_batch_size_images_sum", model="tiny-random"), 5)
            self.assertEqual(value("dmdserve_requests_in_flight", model="tiny-random"), 0)
            self.assertEqual(value("dmdserve_queue_depth_images", model="tiny-random"), 0)
            self.assertEqual(value("dmdserve_model_ready", model="tiny-random"), 1)
            # The batch size was measured at warm-up; ListModels and the gauge agree on it.
            batching = server.stub.ListModels(pb.ListModelsRequest(), timeout=10).models[0].batching
            self.assertEqual([b.device for b in batching], ["cpu"])
            measured = [t.batch_size for t in batching[0].measured]
            self.assertEqual(measured[0], 1)
            self.assertIn(batching[0].max_batch_size, measured)
            self.assertEqual(value("dmdserve_max_batch_size_images", model="tiny-random",
                                   device="cpu"), batching[0].max_batch_size)
            # The thread counts come from the CPU budget, and the log says so.
            self.assertRegex("\n".join(server.lines),
                             r"CPU budget: \d+ CPUs? \(affinity \d+, .*\); \d+ model worker")
            self.assertIsNotNone(value("dmdserve_build_info"))


class LoadTest(unittest.TestCase):
    def test_burst_beyond_the_queue_is_rejected_while_accepted_requests_complete(self):
        with Server("--max_queue_images=8", "--max_batch_size=1", "--workers=1") as server:
            def one(i):
                try:
                    r = server.stub.Generate(
                        pb.GenerateRequest(prompt=f"a coat {i}", num_images=4, seed=i), timeout=120)
                    return ("ok", len(r.images))
                except grpc.RpcError as e:
                    return (e.code(), e.details())

            with concurrent.futures.ThreadPoolExecutor(48) as pool:
                results = list(pool.map(one, range(96)))
            ok = [r for r in results if r[0] == "ok"]
            rejected = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
            self.assertEqual(len(ok) + len(rejected), len(results), results)
            self.assertGreater(len(ok), 0)
            self.assertGreater(len(rejected), 0)
            self.assertTrue(all(n == 4 for _, n in ok))
            self.assertIn("queue full", rejected[0][1])
            text = server.metrics()
            self.assertEqual(metric_value(text, "dmdserve_requests_total", model="tiny-random",
                                          method="Generate", code="RESOURCE_EXHAUSTED"),
                             len(rejected))

    def test_expired_requests_are_dropped_before_compute(self):
        with Server("--max_batch_size=1", "--workers=1", "--max_queue_images=1000") as server:
            # A long queue ahead, then requests whose deadline ends while they wait.
            backlog = [server.stub.Generate.future(
                pb.GenerateRequest(prompt="a shirt", num_images=8, seed=i), timeout=120)
                for i in range(60)]
            self.assertTrue(wait_until(lambda: metric_value(
                server.metrics(), "dmdserve_queue_depth_images", model="tiny-random") >= 300))
            late = [server.stub.Generate.future(pb.GenerateRequest(prompt="late", seed=i),
                                                timeout=0.05) for i in range(5)]
            for f in late:
                with self.assertRaises(grpc.RpcError) as ctx:
                    f.result()
                self.assertEqual(ctx.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
            for f in backlog:
                self.assertEqual(len(f.result().images), 8)
            def dropped():
                text = server.metrics()
                return sum(metric_value(text, "dmdserve_requests_total", model="tiny-random",
                                        method="Generate", code=c) or 0
                           for c in ("DEADLINE_EXCEEDED", "CANCELLED"))

            # The late requests sit behind the backlog; the server drops them when it gets there.
            self.assertTrue(wait_until(lambda: dropped() >= 5), dropped())
            self.assertEqual(dropped(), 5)
            text = server.metrics()
            # Dropping them emptied the queue, and the gauge says so (not a stale count).
            self.assertEqual(metric_value(text, "dmdserve_queue_depth_images",
                                          model="tiny-random"), 0)
            # Only the backlog's images were ever computed.
            self.assertEqual(metric_value(text, "dmdserve_batch_size_images_sum",
                                          model="tiny-random"), 60 * 8)


class DrainTest(unittest.TestCase):
    SLOW_MODEL = "tiny-random-50-steps"

    @classmethod
    def setUpClass(cls):
        # tiny-random with a 50-step guided schedule (the teacher's): 100 generator calls an
        # image, so that a backlog takes seconds to drain whatever the BLAS, and SIGTERM lands
        # while accepted requests are still unfinished.
        cls.tmp = tempfile.TemporaryDirectory()
        cls.slow_bundle = make_slow_bundle(cls.tmp.name, cls.SLOW_MODEL)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def busy_server(self, requests, *flags):
        """A server computing one image per batch (plus `flags`), with `requests` 8-image
        requests accepted and at least one of them unfinished."""
        server = Server("--max_batch_size=1", "--workers=1", "--max_queue_images=1000", *flags,
                        model_dirs=(self.slow_bundle,))
        futures = [server.stub.Generate.future(
            pb.GenerateRequest(prompt="a sandal", num_images=8, seed=i), timeout=120)
            for i in range(requests)]

        def counts():
            text = server.metrics()
            in_flight = metric_value(text, "dmdserve_requests_in_flight", model=self.SLOW_MODEL)
            finished = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                           if line.startswith("dmdserve_requests_total{")
                           and 'method="Generate"' in line)
            return in_flight or 0, finished

        try:
            # Every request accepted (in flight or finished), none lost to the race with SIGTERM.
            self.assertTrue(wait_until(lambda: sum(counts()) == requests), counts())
            self.assertGreater(counts()[0], 0, "the backlog drained before SIGTERM: vacuous")
        except BaseException:
            server.stop(signal.SIGKILL)  # no server outlives a failed test
            raise
        return server, futures

    def test_sigterm_finishes_every_accepted_request_and_exits_zero(self):
        server, futures = self.busy_server(16)
        started = time.monotonic()
        server.terminate()
        for f in futures:
            self.assertEqual(len(f.result().images), 8)  # accepted before SIGTERM: completes
        self.assertEqual(server.stop(), 0, server.log())
        self.assertLess(time.monotonic() - started, 60)
        log = server.log()
        self.assertIn("received SIGTERM", log)
        self.assertIn("stopped", log)

    def test_after_the_grace_every_client_gets_its_true_status(self):
        # The queue outlasts a 1-s grace: what is still queued then is cancelled, and each client
        # hears so (CANCELLED), or gets its images, before the connection closes.
        server, futures = self.busy_server(24, "--drain_grace_s=1")
        server.terminate()
        statuses = []
        for f in futures:
            error = f.exception()
            if error is None:
                self.assertEqual(len(f.result().images), 8)
                statuses.append("OK")
            else:
                self.assertEqual(error.code(), grpc.StatusCode.CANCELLED, error.details())
                self.assertIn("drain grace of 1s ended", error.details())
                statuses.append("CANCELLED")
        self.assertIn("CANCELLED", statuses)
        self.assertEqual(server.stop(), 0, server.log())
        self.assertIn("drain grace of 1s ended: cancelled", server.log())

    def test_second_signal_during_drain_exits_at_once(self):
        server, futures = self.busy_server(100)
        server.terminate()
        self.assertTrue(wait_until(lambda: any("draining" in line for line in server.lines)))
        self.assertEqual(server.stop(again=True), 1, server.log())
        self.assertIn("second signal during drain", server.log())
        unfinished = sum(1 for f in futures if f.exception() is not None)
        self.assertGreater(unfinished, 0)  # it really left work behind

    def test_new_requests_after_sigterm_are_refused(self):
        server, futures = self.busy_server(16)
        server.terminate()
        self.assertTrue(wait_until(lambda: any("draining" in line for line in server.lines)))
        with self.assertRaises(grpc.RpcError) as ctx:
            server.stub.Generate(pb.GenerateRequest(prompt="too late"), timeout=30)
        self.assertEqual(ctx.exception.code(), grpc.StatusCode.UNAVAILABLE)
        for f in futures:
            self.assertEqual(len(f.result().images), 8)
        self.assertEqual(server.stop(), 0, server.log())


if __name__ == "__main__":
    unittest.main()
