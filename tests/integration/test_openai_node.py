"""The official OpenAI Node SDK (npm `openai`, pinned in tests/openai-node/package-lock.json)
against the real server's OpenAI-compatible API: images.generate returns the gRPC API's PNGs for
the same prompt and seeds, models.list pages through the served models, and every error reaches
the SDK as its own error class with OpenAI's status, code and param."""
import base64
import json
import os
import subprocess
import tempfile
import unittest

from harness import SOURCE_DIR, Server, pb, write_api_keys

SDK_DIR = os.path.join(SOURCE_DIR, "tests", "openai-node")
SECRETS = {"alice": "alice-secret-1", "limited": "limited-secret-2"}


def install_sdk():
    """npm ci of the pinned SDK into tests/openai-node/node_modules, once."""
    if not os.path.isdir(os.path.join(SDK_DIR, "node_modules", "openai")):
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=SDK_DIR,
                       check=True, timeout=300)


class OpenAiNodeSdkTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        install_sdk()
        cls.tmp = tempfile.TemporaryDirectory()
        keys_file = write_api_keys(cls.tmp.name, {"alice": (SECRETS["alice"], None),
                                                  "limited": (SECRETS["limited"], 1)})
        server = Server(f"--api_keys_file={keys_file}",
                        "--http_model_aliases=gpt-image-1=tiny-random")
        try:
            env = dict(os.environ, DMDSERVE_BASE_URL=f"http://127.0.0.1:{server.http_port}/v1",
                       DMDSERVE_API_KEY=SECRETS["alice"], DMDSERVE_LIMITED_KEY=SECRETS["limited"],
                       DMDSERVE_MODEL_ALIAS="gpt-image-1")
            run = subprocess.run(["node", "sdk_check.mjs"], cwd=SDK_DIR, env=env, timeout=300,
                                 capture_output=True, text=True)
            assert run.returncode == 0, run.stderr
            cls.report = json.loads(run.stdout)
            cls.grpc_images = server.stub.Generate(
                pb.GenerateRequest(prompt="a photo of a sneaker", num_images=2, seed=7, width=64,
                                   height=32),
                metadata=[("authorization", f"Bearer {SECRETS['alice']}")], timeout=120).images
        finally:
            cls.code = server.stop()
            cls.log = server.log()

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_server_stopped_cleanly(self):
        self.assertEqual(self.code, 0, self.log)

    def test_images_are_the_grpc_images(self):
        images = self.report["images"]
        self.assertIsInstance(images["created"], int)
        self.assertEqual(images["seeds"], [7, 8])
        self.assertEqual([base64.b64decode(b) for b in images["b64"]],
                         [i.data for i in self.grpc_images])

    def test_models_list(self):
        self.assertEqual(self.report["modelIds"], ["tiny-random"])

    def assertSdkError(self, name, sdk_class, status, code=None, param=None):
        error = self.report["errors"][name]
        self.assertEqual((error["class"], error["status"]), (sdk_class, status), error)
        self.assertTrue(error["message"], error)
        if code is not None:
            self.assertEqual(error["code"], code, error)
        if param is not None:
            self.assertEqual(error["param"], param, error)
        return error

    def test_errors_reach_the_sdk_as_their_classes(self):
        # As OpenAI answers it: no param, the served models in the message.
        error = self.assertSdkError("unknownModel", "NotFoundError", 404, code="model_not_found")
        self.assertIsNone(error["param"], error)
        self.assertIn("tiny-random", error["message"])
        self.assertIn("48", self.assertSdkError("badSize", "BadRequestError", 400)["message"])
        self.assertSdkError("urlFormat", "BadRequestError", 400, param="response_format")
        self.assertSdkError("emptyPrompt", "BadRequestError", 400, param="prompt")
        error = self.assertSdkError("wrongKey", "AuthenticationError", 401)
        self.assertNotIn("not-a-key", error["message"])

    def test_rate_limit_is_a_rate_limit_error_with_retry_after(self):
        self.assertIsNone(self.report["errors"]["withinBurst"]["class"])
        error = self.assertSdkError("overRate", "RateLimitError", 429, code="rate_limit_exceeded")
        self.assertIn("limited", error["message"])
        self.assertEqual(error["retryAfter"], "1")


if __name__ == "__main__":
    unittest.main()
