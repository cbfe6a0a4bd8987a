"""The soak and chaos command (scripts/bench/soak.py): a short run against the real server must
pass every invariant, and each invariant check must catch what it is there to catch.

The run is short (about 15 s of load) so that the command cannot rot unnoticed; the long runs
are docs/RELIABILITY.md's. Nothing here asserts speed: the run's invariants are counts and
statuses, and the load is sized from the capacity measured on the machine it runs on.
"""
import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
import unittest

from harness import BUILD_DIR, SOURCE_DIR

sys.path.insert(0, os.path.join(SOURCE_DIR, "scripts", "bench"))
import soak  # noqa: E402
import soak_http as sh  # noqa: E402
import soak_report as sr  # noqa: E402

SOAK = os.path.join(SOURCE_DIR, "scripts", "bench", "soak.py")


class SoakSmokeTest(unittest.TestCase):
    def test_a_short_soak_passes_every_invariant(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "soak.json")
            run = subprocess.run(
                [sys.executable, SOAK, f"--build={BUILD_DIR}", "--minutes=0.25",
                 "--capacity_s=2", "--warmup_s=5", f"--json_out={out}",
                 f"--log_out={os.path.join(tmp, 'server.log')}"],
                cwd=SOURCE_DIR, capture_output=True, text=True, timeout=400)
            report_text = run.stdout + run.stderr
            if run.returncode != 0 and os.path.exists(os.path.join(tmp, "server.log")):
                with open(os.path.join(tmp, "server.log")) as f:
                    report_text += "\nserver log (end):\n" + "".join(f.readlines()[-80:])
            self.assertEqual(run.returncode, 0, report_text)
            with open(out) as f:
                report = json.load(f)
        self.assertEqual(report["failures"], [])
        self.assertEqual(report["requests_lost"], 0)
        self.assertTrue(all(ok for _, ok in report["checks"]))
        self.assertGreaterEqual(len(report["checks"]), 15)
        # Every kind of request, fault and bad input was sent, and answered as its kind allows.
        kinds = set(report["by_kind"])
        self.assertTrue(set(sr.KINDS) <= kinds, set(sr.KINDS) - kinds)
        self.assertGreater(report["by_kind"]["generate"].get("OK", 0), 0)
        self.assertGreater(report["by_kind"]["fault_raise"].get("INTERNAL", 0), 0)
        self.assertGreater(report["by_kind"]["fault_oom"].get(sr.OUT_OF_MEMORY, 0), 0)
        self.assertEqual(report["drain"]["exit_code"], 0)
        # HTTP as gRPC: served under overload, refused with 429, drained, 503 after SIGTERM.
        for kind in sr.HTTP_NORMAL_KINDS:
            self.assertGreater(report["by_kind"][kind].get("HTTP 200", 0), 0, kind)
        self.assertIn("HTTP 413", report["by_kind"]["bad:http: body over the limit"])
        self.assertEqual(report["drain"]["http_requests"], 6)
        self.assertEqual(report["drain"]["after_sigterm_http"], ["HTTP 503"] * 3)
        self.assertTrue(any(k.endswith("POST /v1/images/generations/OK")
                            for k in report["server_counts"]))
        self.assertIn("| invariant | result |", run.stdout)


class TopUpTest(unittest.TestCase):
    """A short run's Poisson arrivals can miss a rare kind: the drive tops every kind up."""

    def load(self, launched):
        load = soak.Load.__new__(soak.Load)
        load.launched = collections.Counter(launched)
        load.bad = ["b1", "b2", "b3"]
        load.http = type("Http", (), {"bad": ["h1", "h2"]})()
        sent = []
        load.launch = lambda kind: (sent.append(kind), load.launched.update([kind]))
        return load, sent

    def test_kinds_chance_left_out_are_sent_once_and_every_bad_input_in_turn(self):
        load, sent = self.load({"generate": 9, "bad": 1})
        load.top_up(["generate", "oversize_metadata", "bad", "http_bad"])
        self.assertEqual(collections.Counter(sent),
                         {"oversize_metadata": 1, "bad": 2, "http_bad": 2})

    def test_a_run_that_sent_everything_sends_nothing_more(self):
        load, sent = self.load({"generate": 9, "oversize_metadata": 1, "bad": 7, "http_bad": 2})
        load.top_up(["generate", "oversize_metadata", "bad", "http_bad"])
        self.assertEqual(sent, [])


class LedgerTest(unittest.TestCase):
    def test_a_request_without_a_final_status_is_lost(self):
        ledger = sr.Ledger()
        ledger.finish(ledger.start("generate", 1), "OK", 0.1, 1)
        ledger.start("stream", 2)
        failures = sr.check_ledger(ledger)
        self.assertEqual(len(failures), 1)
        self.assertIn("lost: 1 'stream'", failures[0])

    def test_a_status_its_kind_does_not_allow_fails(self):
        ledger = sr.Ledger()
        for kind, status in [("generate", "OK"), ("generate", sr.QUEUE_FULL),
                             ("fault_raise", "INTERNAL"), ("short_deadline", "DEADLINE_EXCEEDED"),
                             ("generate", "INTERNAL"), ("stream", "UNAVAILABLE"),
                             ("fault_oom", "INTERNAL")]:
            ledger.finish(ledger.start(kind), status, details="why")
        failures = sr.check_ledger(ledger)
        self.assertEqual(len(failures), 3, failures)
        self.assertTrue(any("'generate' request(s) ended INTERNAL" in f for f in failures))
        self.assertTrue(any("'stream' request(s) ended UNAVAILABLE" in f for f in failures))
        self.assertTrue(any("'fault_oom' request(s) ended INTERNAL" in f for f in failures))

    def test_a_request_closed_twice_is_a_bug_in_the_soak(self):
        ledger = sr.Ledger()
        request = ledger.start("generate")
        ledger.finish(request, "OK")
        with self.assertRaises(KeyError):
            ledger.finish(request, "OK")

    def test_resource_exhausted_is_told_apart_by_its_cause(self):
        self.assertEqual(sr.label("RESOURCE_EXHAUSTED", "queue full: 256 images queued"),
                         sr.QUEUE_FULL)
        self.assertEqual(sr.label("RESOURCE_EXHAUSTED",
                                  "model 'oom' ran out of device memory on a batch of 2"),
                         sr.OUT_OF_MEMORY)
        self.assertEqual(sr.label("RESOURCE_EXHAUSTED", "Received message larger than max"),
                         sr.TOO_LARGE)
        self.assertEqual(sr.label("INTERNAL", "x"), "INTERNAL")


class MetricsAgreementTest(unittest.TestCase):
    def counts(self, **extra_kinds):
        """client_counts() of a fixed ledger plus `extra_kinds` (kind=(status, n))."""
        ledger = sr.Ledger()
        for kind, status, n in [("generate", "OK", 5), ("generate", sr.QUEUE_FULL, 2),
                                ("stream", "OK", 3), ("fault_raise", "INTERNAL", 2)] + [
                                    (k, s, n) for k, (s, n) in extra_kinds.items()]:
            for _ in range(n):
                ledger.finish(ledger.start(kind), status)
        return sr.client_counts(ledger, {"fault_raise": "faulty"}.get)

    SERVER = {(None, "Generate", "OK"): 5, ("_unknown", "Generate", "RESOURCE_EXHAUSTED"): 2,
              (None, "GenerateStream", "OK"): 3, ("faulty", "Generate", "INTERNAL"): 2}

    def test_equal_counts_agree(self):
        self.assertEqual(sr.check_metrics(self.counts(), self.SERVER, ("faulty",)), [])

    def test_a_count_the_client_never_saw_fails(self):
        server = {**self.SERVER, ("m", "Generate", "INTERNAL"): 1}
        failures = sr.check_metrics(self.counts(), server, ("faulty",))
        self.assertTrue(any("Generate INTERNAL: the server counted 3" in f for f in failures),
                        failures)

    def test_a_request_the_server_did_not_count_fails(self):
        server = {**self.SERVER, (None, "GenerateStream", "OK"): 2}
        failures = sr.check_metrics(self.counts(), server, ())
        self.assertTrue(any("GenerateStream OK: the server counted 2, the client saw 3" in f
                            for f in failures), failures)

    def test_cancelled_requests_may_end_either_way_on_the_server(self):
        client = self.counts(cancel_mid_flight=("CANCELLED", 2))
        server = {**self.SERVER, (None, "Generate", "OK"): 6, (None, "Generate", "CANCELLED"): 1}
        self.assertEqual(sr.check_metrics(client, server, ("faulty",)), [])
        server[(None, "Generate", "CANCELLED")] = 2  # 3 server-side for 2 cancelled clients
        self.assertTrue(sr.check_metrics(client, server, ("faulty",)))

    def test_a_request_that_surely_reached_the_server_must_be_counted(self):
        # A stream cancelled after its first image: the server had it, and must finish it.
        client = self.counts(stream_cancel_after_first=("CANCELLED", 2))
        server = {**self.SERVER, (None, "GenerateStream", "CANCELLED"): 2}
        self.assertEqual(sr.check_metrics(client, server), [])
        server[(None, "GenerateStream", "CANCELLED")] = 1  # one never finished on the server
        failures = sr.check_metrics(client, server)
        self.assertEqual(failures, ["metrics: GenerateStream in all: the server counted 4, the "
                                    "client sent 5"])

    def test_an_exactly_compared_model_must_match_exactly(self):
        server = dict(self.SERVER)
        del server[("faulty", "Generate", "INTERNAL")]
        server[("other", "Generate", "INTERNAL")] = 2  # right total, wrong model
        failures = sr.check_metrics(self.counts(), server, ("faulty",))
        self.assertEqual(failures, ["metrics: faulty/Generate/INTERNAL: the server counted 0, "
                                    "the client saw 2"])

    def test_requests_total_is_parsed_from_the_exposition(self):
        text = ('# HELP dmdserve_requests_total x\n'
                'dmdserve_requests_total{code="OK",method="Generate",model="m"} 7\n'
                'dmdserve_requests_total_created 1\n'
                'dmdserve_images_generated_total{model="m"} 9\n')
        self.assertEqual(sr.parse_requests_total(text), {("m", "Generate", "OK"): 7.0})
        self.assertEqual(sr.metric_sum(text, "dmdserve_images_generated_total", model="m"), 9.0)


class HttpLedgerTest(unittest.TestCase):
    def test_http_statuses_outside_a_kinds_set_fail(self):
        ledger = sr.Ledger()
        for kind, status in [("http_images", "HTTP 200"), ("http_generate", "HTTP 429"),
                             ("http_short_deadline", "HTTP 504"), ("http_slowloris", "HELD"),
                             ("http_generate", "HTTP 503"), ("http_images", "HTTP 504"),
                             ("http_stream", "HTTP 429(no Retry-After)"),
                             ("http_stream", "HTTP 200(error line)"),
                             ("http_generate", "BROKEN(ConnectionResetError)")]:
            ledger.finish(ledger.start(kind), status, details="why")
        failures = sr.check_ledger(ledger)
        self.assertEqual(len(failures), 5, failures)
        for expected in ("'http_generate' request(s) ended HTTP 503",
                         "'http_images' request(s) ended HTTP 504",
                         "'http_stream' request(s) ended HTTP 429(no Retry-After)",
                         "'http_stream' request(s) ended HTTP 200(error line)",
                         "'http_generate' request(s) ended BROKEN(ConnectionResetError)"):
            self.assertTrue(any(expected in f for f in failures), (expected, failures))

    def test_an_http_200_counts_its_images_and_latency(self):
        ledger = sr.Ledger()
        ledger.finish(ledger.start("http_images", 4), "HTTP 200", 0.5, 4)
        ledger.finish(ledger.start("http_images", 2), "HTTP 429", 0.01)
        self.assertEqual(ledger.images_ok["http_images"], 4)
        self.assertEqual(ledger.latency_ok["http_images"], [0.5])

    def ledger(self, rows):
        ledger = sr.Ledger()
        for kind, status, n in rows:
            for _ in range(n):
                ledger.finish(ledger.start(kind), status)
        return sr.client_counts(ledger, lambda kind: "m")

    def test_http_statuses_are_compared_as_the_codes_the_server_counts(self):
        sr.add_bad_input_kind("http: test 413", "POST /v1/images/generations", "HTTP 413")
        sr.add_bad_input_kind("http: test 404 path", None, "HTTP 404")
        for case in ("http: test 413", "http: test 404 path"):
            self.addCleanup(sr.KINDS.pop, sr.BAD_PREFIX + case)
        client = self.ledger([("http_images", "HTTP 200", 3), ("http_images", "HTTP 429", 2),
                              ("http_short_deadline", "HTTP 504", 1),
                              ("bad:http: test 413", "HTTP 413", 1),
                              ("bad:http: test 404 path", "HTTP 404", 4)])
        server = {("m", "POST /v1/images/generations", "OK"): 3,
                  ("m", "POST /v1/images/generations", "RESOURCE_EXHAUSTED"): 2,
                  ("m", "POST /v1/generate", "DEADLINE_EXCEEDED"): 1,
                  ("_unknown", "POST /v1/images/generations", "OUT_OF_RANGE"): 1}
        self.assertEqual(sr.check_metrics(client, server), [])
        # A 413 the server counted as INVALID_ARGUMENT, and a routing 404 it counted: both fail.
        del server[("_unknown", "POST /v1/images/generations", "OUT_OF_RANGE")]
        server[("_unknown", "POST /v1/images/generations", "INVALID_ARGUMENT")] = 1
        server[("_unknown", "POST /v1/nothing", "NOT_FOUND")] = 4
        failures = sr.check_metrics(client, server)
        self.assertIn("metrics: POST /v1/images/generations OUT_OF_RANGE: the server counted 0, "
                      "the client saw 1", failures)
        self.assertIn("metrics: POST /v1/nothing NOT_FOUND: the server counted 4, the client "
                      "saw 0", failures)

    def test_an_abandoned_stream_must_be_counted_once(self):
        client = self.ledger([("http_stream_abandon", "ABANDONED", 2)])
        ok = {("m", "POST /v1/generate:stream", "CANCELLED"): 1,
              ("m", "POST /v1/generate:stream", "OK"): 1}
        self.assertEqual(sr.check_metrics(client, ok), [])
        self.assertEqual(sr.check_metrics(client, {("m", "POST /v1/generate:stream", "OK"): 1}),
                         ["metrics: POST /v1/generate:stream in all: the server counted 1, the "
                          "client sent 2"])


class StallIsolationTest(unittest.TestCase):
    def test_http_close_to_grpc_passes(self):
        grpc = [0.4] * 99 + [0.55]
        self.assertEqual(sr.check_stall_isolation([0.4] * 99 + [1.5], grpc), [])  # +1 s slack
        self.assertEqual(sr.check_stall_isolation([0.1] * 100, grpc), [])

    def test_http_delayed_beyond_the_bound_fails(self):
        grpc = [0.4] * 99 + [0.55]
        failures = sr.check_stall_isolation([0.4] * 98 + [1.7] * 2, grpc)
        self.assertEqual(failures, ["stall isolation: HTTP p99 1700 ms over the bound 1650 ms "
                                    "(gRPC p99 550 ms)"])
        # A slow gRPC tail scales the bound: 3 x 2 s.
        self.assertEqual(sr.check_stall_isolation([5.9] * 10, [2.0] * 10), [])
        self.assertTrue(sr.check_stall_isolation([6.1] * 10, [2.0] * 10))

    def test_nothing_to_compare_fails(self):
        self.assertTrue(sr.check_stall_isolation([], [0.1]))
        self.assertTrue(sr.check_stall_isolation([0.1], []))


class HttpReadingTest(unittest.TestCase):
    @staticmethod
    def read(data, chunked=True):
        async def go():
            reader = asyncio.StreamReader()
            reader.feed_data(data)
            reader.feed_eof()
            status, headers = await sh.read_head(reader)
            return status, headers, await sh.read_body(reader, headers)
        return asyncio.run(go())

    def test_a_chunked_body_is_decoded(self):
        status, headers, body = self.read(
            b"HTTP/1.1 429 Too Many\r\nRetry-After: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        self.assertEqual((status, body), (429, b"abcde"))
        self.assertEqual(sh.status_label(status, headers), "HTTP 429")
        self.assertEqual(sh.status_label(429, {}), "HTTP 429(no Retry-After)")

    def test_a_cut_body_is_broken(self):
        with self.assertRaises(sh.HttpBroken):  # no terminating chunk
            self.read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        with self.assertRaises(sh.HttpBroken):
            self.read(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        with self.assertRaises(sh.HttpBroken):
            self.read(b"HTTP/1.1 20")


class GrowthTest(unittest.TestCase):
    @staticmethod
    def samples(rss):
        return [{"t": float(t), "rss_mib": v, "fds": 20, "threads": 30} for t, v in enumerate(rss)]

    def test_growth_after_warm_up_beyond_the_limit_fails(self):
        # Warm-up grows freely (0..10 s); after it, 2 MiB/s for 40 s.
        rss = [100 + 10 * t for t in range(10)] + [200 + 2 * t for t in range(41)]
        summary = sr.growth_summary(self.samples(rss), 0, 10, 50, window_s=5)
        self.assertAlmostEqual(summary["rss_mib"]["slope_per_min"], 120, delta=1)
        failures = sr.check_growth(summary, {"rss_mib": 64, "fds": 0, "threads": 0})
        self.assertEqual(len(failures), 1)
        self.assertIn("rss_mib grew by 70.0", failures[0])

    def test_a_flat_steady_state_passes(self):
        rss = [100 + 10 * t for t in range(10)] + [200 + (t % 3) for t in range(41)]
        summary = sr.growth_summary(self.samples(rss), 0, 10, 50, window_s=5)
        self.assertEqual(sr.check_growth(summary, {"rss_mib": 8, "fds": 0, "threads": 0}), [])

    def test_no_samples_after_warm_up_fails(self):
        summary = sr.growth_summary(self.samples([100] * 5), 0, 10, 50, window_s=5)
        self.assertTrue(sr.check_growth(summary, {"rss_mib": 64}))


class ReportTest(unittest.TestCase):
    def test_markdown_lists_kinds_resources_and_failures(self):
        resources = {k: {"start": 1, "steady": 2, "end": 3, "max": 4, "slope_per_min": 0.5}
                     for k in ("rss_mib", "fds", "threads")}
        report = {
            "minutes": 1, "load_factor": 2, "machine": "m", "commit": "c", "date": "d",
            "capacity": {"concurrency": 16, "images_per_second": 100},
            "offered_images_per_second": 200, "offered_requests_per_second": 50,
            "target_images_per_second": 200, "served_images_per_second": 100,
            "server_images_generated": 6000,
            "requests_sent": 10, "requests_lost": 1, "scrapes": 3,
            "p99_ok": {"grpc": 0.5, "http": 0.6}, "hostile_http_held_median": 7,
            "by_kind": {"generate": {"OK": 9}, "bad:x": {"INVALID_ARGUMENT": 1}},
            "latency_ok": {"generate": {"p50": 0.01, "p99": 0.02}},
            "resources": resources, "resources_after": {"rss_mib": 3, "fds": 20, "threads": 9},
            "samples": [{"t": t, "rss_mib": 100 + t} for t in range(0, 200, 10)],
            "load_window": [5, 130],
            "checks": [("every request ended with a final status", False)],
            "failures": ["lost: 1 'stream' request(s) ended without a final status"]}
        text = sr.markdown(report)
        self.assertIn("| generate | 9 | OK 9 | 10.0 | 20.0 |", text)
        self.assertIn("dmdserve_images_generated_total) | 100 images/s (100) |", text)
        self.assertIn("with a median of 7 hostile HTTP clients held open | 500.0 / 600.0 ms |",
                      text)
        self.assertLess(text.index("| generate |"), text.index("| bad:x |"))
        self.assertIn("| every request ended with a final status | **FAIL** |", text)
        self.assertIn("- lost: 1 'stream'", text)
        self.assertIn("and at the end of each of its minutes: 100, 160, 220\n", text)
        self.assertEqual(collections.Counter(text.split("\n"))["| RSS MiB | 1 | 2 | 3 | 4 | "
                                                              "+0.5 | 3 |"], 1)


if __name__ == "__main__":
    unittest.main()
