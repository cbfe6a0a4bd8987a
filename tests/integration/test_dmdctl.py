"""dmdctl against the real server: each command's output contract and exit codes."""
import json
import os
import tempfile
import unittest

from harness import SharedServerTestCase, decode_png, run_dmdctl


class DmdctlTest(SharedServerTestCase):
    def dmdctl(self, *args):
        return run_dmdctl(*args, target=self.server.target)

    def test_tokenize_json_is_exactly_one_object_with_the_four_fields(self):
        r = self.dmdctl("tokenize", "--json", "a photo of a cat")
        self.assertEqual(r.returncode, 0, r.stderr)
        obj = json.loads(r.stdout)  # the whole stdout is one JSON document
        self.assertEqual(set(obj), {"ids", "tokens", "input_ids", "truncated_tokens"})
        self.assertEqual(obj["ids"], [320, 1125, 539, 320, 2368])
        self.assertEqual(obj["tokens"], ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"])
        self.assertEqual(obj["input_ids"][:7], [49406, 320, 1125, 539, 320, 2368, 49407])
        self.assertEqual(len(obj["input_ids"]), 77)
        self.assertEqual(obj["truncated_tokens"], 0)

    def test_tokenize_warns_about_truncation(self):
        r = self.dmdctl("tokenize", "--json", " ".join(["boot"] * 80))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout)["truncated_tokens"], 5)
        r = self.dmdctl("tokenize", " ".join(["boot"] * 80))
        self.assertIn("5", r.stderr)

    def test_generate_writes_the_images_and_a_json_summary(self):
        for stream in ([], ["--stream"]):
            with self.subTest(stream=bool(stream)), tempfile.TemporaryDirectory() as out:
                r = self.dmdctl("generate", "--num_images=3", "--seed=11", f"--out_dir={out}",
                                "--json", "--request_id=cli-1", *stream, "a photo of a sneaker")
                self.assertEqual(r.returncode, 0, r.stderr)
                summary = json.loads(r.stdout)
                self.assertEqual(summary["model"], "tiny-random")
                self.assertEqual(summary["request_id"], "cli-1")
                self.assertEqual(sorted(i["seed"] for i in summary["images"]), [11, 12, 13])
                for image in summary["images"]:
                    with open(image["path"], "rb") as f:
                        w, h, mode, _ = decode_png(f.read())
                    self.assertEqual((w, h, mode), (32, 32, "L"))
                    self.assertTrue(os.path.dirname(image["path"]) == out)
                self.assertEqual(summary["truncated_tokens"], 0)

    def test_models_json_lists_the_default_model(self):
        r = self.dmdctl("models", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("tiny-random", r.stdout)
        self.assertIn("tiny-random", self.dmdctl("models").stdout)

    def test_health_exit_code_follows_serving_status(self):
        r = self.dmdctl("health")
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "SERVING"))
        r = run_dmdctl("health", "--timeout_s=2", target="127.0.0.1:1")
        self.assertEqual(r.returncode, 1)
        self.assertIn("error: UNAVAILABLE", r.stderr)

    def test_errors_print_the_code_and_exit_1(self):
        r = self.dmdctl("generate", "--model=nope", "x")
        self.assertEqual(r.returncode, 1)
        self.assertIn("error: NOT_FOUND: model 'nope' is not served", r.stderr)
        r = self.dmdctl("no-such-command")
        self.assertEqual(r.returncode, 2)

    def test_bench_reports_throughput_and_latency(self):
        r = self.dmdctl("bench", "--concurrency=4", "--count=40", "--num_images=2", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        report = json.loads(r.stdout)
        self.assertEqual((report["requests"], report["ok"], report["failed"]), (40, 40, 0))
        self.assertEqual(report["images"], 80)
        self.assertGreater(report["images_per_second"], 0)
        lat = report["latency_seconds"]
        self.assertLessEqual(lat["p50"], lat["p90"])
        self.assertLessEqual(lat["p90"], lat["p99"])
        self.assertLessEqual(lat["p99"], lat["max"])
        self.assertEqual(report["status_codes"], {"OK": 40})


if __name__ == "__main__":
    unittest.main()
