"""API keys: every ImageGeneration call needs a key from --api_keys_file (the file holds only
SHA-256 hashes), health checks stay open, per-key rate limits, the key's name in logs and
metrics, reload on SIGHUP, and dmdctl's --api_key / DMDSERVE_API_KEY."""
import os
import signal
import subprocess
import tempfile
import unittest

import grpc

from harness import DMDCTL_BIN, Server, api_key_line, metric_value, pb, wait_until

SECRETS = {"alice": "alice-secret-1", "bob": "bob-secret-2", "carol": "carol-secret-3"}


def key_line(name, rate=None):
    return api_key_line(name, SECRETS[name], rate)


class ApiKeysTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.keys_file = os.path.join(cls.tmp.name, "keys")
        with open(cls.keys_file, "w") as f:
            f.write("# name sha256 [images per second]\n" + key_line("alice") +
                    key_line("bob", 2))
        cls.server = Server(f"--api_keys_file={cls.keys_file}")

    @classmethod
    def tearDownClass(cls):
        code = cls.server.stop()
        cls.tmp.cleanup()
        assert code == 0, cls.server.log()

    def call(self, method, request, name=None, secret=None):
        metadata = [("authorization", f"Bearer {secret or SECRETS[name]}")] if name or secret else []
        result = getattr(self.server.stub, method)(request, timeout=30, metadata=metadata)
        return list(result) if method == "GenerateStream" else result

    def assert_unauthenticated(self, method, request, **key):
        with self.assertRaises(grpc.RpcError) as caught:
            self.call(method, request, **key)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
        return caught.exception.details()

    def test_every_method_needs_a_key_and_health_stays_open(self):
        generate = pb.GenerateRequest(prompt="a boot", seed=1)
        for method, request in (("Generate", generate), ("GenerateStream", generate),
                                ("ListModels", pb.ListModelsRequest()),
                                ("Tokenize", pb.TokenizeRequest(text="a boot"))):
            with self.subTest(method):
                self.assertIn("missing API key", self.assert_unauthenticated(method, request))
                details = self.assert_unauthenticated(method, request, secret="not-a-key")
                self.assertNotIn("not-a-key", details)
                self.call(method, request, name="alice")
        self.assertEqual(self.server.health_status(), 1)  # SERVING, no key needed

    def test_rate_limit_refuses_what_overdraws_the_key(self):
        request = pb.GenerateRequest(prompt="a boot", num_images=4, seed=2)
        self.assertEqual(len(self.call("Generate", request, name="bob").images), 4)  # the burst
        with self.assertRaises(grpc.RpcError) as caught:
            self.call("Generate", request, name="bob")
        self.assertEqual(caught.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("API key 'bob' is limited to 2 images per second", caught.exception.details())
        self.assertEqual(len(self.call("Generate", request, name="alice").images), 4)  # no limit
        # More than bob's burst could never be admitted: not a retry-later refusal.
        with self.assertRaises(grpc.RpcError) as never:
            self.call("Generate", pb.GenerateRequest(prompt="a boot", num_images=5), name="bob")
        self.assertEqual(never.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("num_images is 5; the limit for API key 'bob' is 4", never.exception.details())

    def test_the_key_name_is_in_logs_and_metrics(self):
        self.call("Generate", pb.GenerateRequest(prompt="a hat", seed=3), name="alice")
        self.assert_unauthenticated("Generate", pb.GenerateRequest(prompt="a hat"))
        self.assertTrue(wait_until(lambda: any("key=alice" in line for line in self.server.lines)))
        text = self.server.metrics()
        self.assertGreaterEqual(
            metric_value(text, "dmdserve_api_key_requests_total", key="alice", code="OK"), 1)
        self.assertGreaterEqual(metric_value(text, "dmdserve_api_key_requests_total",
                                             key="_unauthenticated", code="UNAUTHENTICATED"), 1)
        self.assertNotIn(SECRETS["alice"], text)
        self.assertNotIn(SECRETS["alice"], self.server.log(last=10000))

    def test_dmdctl_sends_the_key_from_flag_or_environment(self):
        base = [DMDCTL_BIN, f"--target={self.server.target}", "models"]
        env = {k: v for k, v in os.environ.items() if k != "DMDSERVE_API_KEY"}
        refused = subprocess.run(base, capture_output=True, text=True, env=env, timeout=60)
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn("UNAUTHENTICATED", refused.stderr)
        by_env = subprocess.run(base, capture_output=True, text=True, timeout=60,
                                env={**env, "DMDSERVE_API_KEY": SECRETS["alice"]})
        self.assertEqual(by_env.returncode, 0, by_env.stderr)
        by_flag = subprocess.run([*base[:2], f"--api_key={SECRETS['alice']}", "models"],
                                 capture_output=True, text=True, env=env, timeout=60)
        self.assertEqual(by_flag.returncode, 0, by_flag.stderr)


class ReloadTest(unittest.TestCase):
    def test_sighup_reloads_the_keys_and_a_bad_file_keeps_the_old_ones(self):
        with tempfile.TemporaryDirectory() as tmp:
            keys_file = os.path.join(tmp, "keys")
            with open(keys_file, "w") as f:
                f.write(key_line("alice"))
            server = Server(f"--api_keys_file={keys_file}")
            try:
                metadata = [("authorization", f"Bearer {SECRETS['carol']}")]
                with self.assertRaises(grpc.RpcError):
                    server.stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=metadata)
                with open(keys_file, "w") as f:
                    f.write(key_line("carol"))
                server.proc.send_signal(signal.SIGHUP)
                self.assertTrue(wait_until(
                    lambda: any("SIGHUP: reloaded 1 API key(s)" in l for l in server.lines)))
                server.stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=metadata)
                with open(keys_file, "w") as f:
                    f.write("carol not-a-hash\n")
                server.proc.send_signal(signal.SIGHUP)
                self.assertTrue(wait_until(
                    lambda: any("API keys not reloaded" in l for l in server.lines)))
                server.stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=metadata)
            finally:
                self.assertEqual(server.stop(), 0, server.log())


if __name__ == "__main__":
    unittest.main()
