"""The playground page (GET / on the HTTP port) in a real headless Chromium, driven over the
DevTools Protocol (cdp.py), against the real server on the embedded fashion-dmd model with an API
key: the page loads without a key, asks for one when the API refuses it, lists the models, takes
a typed prompt, seed and count, and shows every image decoded with its seed and the server's
timings; the images are gRPC's for the same request. Leaves a screenshot in the build directory
(build/playground.png; docs/images/playground.png is a copy of one)."""
import base64
import os
import tempfile
import unittest

from cdp import Browser
from harness import BUILD_DIR, SOURCE_DIR, Server, pb, write_api_keys

FASHION_BUNDLE = os.path.join(SOURCE_DIR, "models", "fashion-dmd")
SECRET = "playground-key"
PROMPT = "a photo of an ankle boot"
SEED = 42
COUNT = 12


class PlaygroundTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        keys_file = write_api_keys(cls.tmp.name, {"web": (SECRET, None)})
        cls.server = Server(f"--api_keys_file={keys_file}", model_dirs=(FASHION_BUNDLE,))

    @classmethod
    def tearDownClass(cls):
        assert cls.server.stop() == 0, cls.server.log()
        cls.tmp.cleanup()

    def test_prompt_to_images_in_a_real_browser(self):
        with Browser() as browser:
            browser.navigate(f"http://127.0.0.1:{self.server.http_port}/")
            self.assertEqual(browser.evaluate("document.title"), "dmdserve playground")
            # No key yet: the model list is refused and the page asks for the key.
            self.assertTrue(browser.wait_for(
                "document.getElementById('status').textContent.includes('UNAUTHENTICATED')"),
                browser.evaluate("document.body.innerText"))
            self.assertTrue(browser.evaluate("document.getElementById('auth').open"))

            browser.type_into("#key", SECRET)
            browser.evaluate("document.getElementById('key').blur()")  # commits the field
            self.assertTrue(browser.wait_for("document.getElementById('model').options.length"),
                            browser.evaluate("document.body.innerText"))
            self.assertEqual(browser.evaluate("document.getElementById('model').value"),
                             "fashion-dmd")
            # The key lives in this tab's sessionStorage only.
            self.assertEqual(browser.evaluate("sessionStorage.getItem('dmdserve.apiKey')"),
                             SECRET)
            self.assertEqual(browser.evaluate("localStorage.length + document.cookie.length"), 0)

            browser.type_into("#prompt", PROMPT)
            browser.type_into("#seed", str(SEED))
            browser.type_into("#count", str(COUNT))
            browser.click("#generate")
            self.assertTrue(browser.wait_for(
                f"(() => {{ const images = [...document.querySelectorAll('#results img')];"
                f" return images.length === {COUNT} &&"
                f" images.every(i => i.complete && i.naturalWidth > 0); }})()", timeout_s=120),
                browser.evaluate("document.body.innerText"))

            shown = browser.evaluate(
                "[...document.querySelectorAll('#results figure')].map(f => ["
                "f.querySelector('.seed').textContent, f.querySelector('img').naturalWidth,"
                "f.querySelector('img').src])")
            self.assertEqual([s for s, _, _ in shown], [f"seed {SEED + i}" for i in range(COUNT)])
            self.assertTrue(all(width == 32 for _, width, _ in shown), shown)
            timings = browser.evaluate("document.getElementById('timings').innerText")
            self.assertFalse(browser.evaluate("document.getElementById('timings').hidden"))
            for name in ("queue", "generator", "total", "batch size"):
                self.assertIn(name, timings)
            self.assertIn("fashion-dmd", timings)

            grpc_images = self.server.stub.Generate(
                pb.GenerateRequest(prompt=PROMPT, num_images=COUNT, seed=SEED), timeout=300,
                metadata=(("authorization", f"Bearer {SECRET}"),)).images
            prefix = "data:image/png;base64,"
            self.assertTrue(all(src.startswith(prefix) for _, _, src in shown))
            self.assertEqual([base64.b64decode(src[len(prefix):]) for _, _, src in shown],
                             [i.data for i in grpc_images])

            # Nothing went wrong in the page: no exception, no CSP violation, no console error
            # (the one expected failure, the 401 before the key, is reported by the page itself).
            problems = [(kind, text) for kind, text in browser.messages
                        if kind in ("exception", "console.error", "log.error")
                        and "401" not in text]
            self.assertEqual(problems, [])

            browser.screenshot(os.path.join(BUILD_DIR, "playground.png"))

        self.assertTrue(any("rpc=POST /v1/generate " in line and "key=web" in line
                            and "http=200" in line for line in self.server.lines))


if __name__ == "__main__":
    unittest.main()
