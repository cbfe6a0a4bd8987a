"""A real headless Chromium driven over the Chrome DevTools Protocol, for the browser tests.

    with Browser() as browser:
        browser.navigate("http://127.0.0.1:8080/")
        browser.evaluate("document.title")

Chromium is Debian's `chromium`, the WebSocket client Debian's python3-websocket
(scripts/install_deps.sh installs both). The browser runs with a fresh profile in a temporary
directory, on a free DevTools port (--remote-debugging-port=0, read back from the profile's
DevToolsActivePort file), in its own process group, which is closed and then killed on exit
(Chromium's helper processes included). One thread drives a Browser.
"""
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request

import websocket

from harness import wait_until


class CdpError(RuntimeError):
    pass


class Browser:
    """One headless Chromium and its first page. Every console message, uncaught exception and
    browser log entry (CSP violations among them) is kept in `messages` as (kind, text)."""

    def __init__(self, width=1100, height=800, timeout_s=60):
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            raise AssertionError("chromium is required (Debian package chromium)")
        self._profile = tempfile.mkdtemp(prefix="dmdserve-chromium-")
        self.proc = subprocess.Popen(
            # No sandbox: tests run as root in containers; /dev/shm there is often tiny.
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-sync",
             "--disable-background-networking", "--disable-component-update",
             "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
             f"--user-data-dir={self._profile}", "--remote-debugging-port=0",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self.messages = []
        self._next_id = 0
        self._ws = None
        try:
            self._connect(timeout_s)
            for domain in ("Page", "Runtime", "Log"):
                self.send(f"{domain}.enable")
            self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    def _connect(self, timeout_s):
        port_file = os.path.join(self._profile, "DevToolsActivePort")

        def port_written():
            if not os.path.exists(port_file):
                return ""
            with open(port_file) as f:
                return f.read().strip()

        if not wait_until(lambda: port_written() or self.proc.poll() is not None,
                          timeout_s=timeout_s):
            raise CdpError("chromium did not open its DevTools port")
        if self.proc.poll() is not None:
            raise CdpError("chromium exited: " + self.proc.stderr.read().decode(errors="replace"))
        port = int(port_written().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        if not pages:
            raise CdpError("chromium has no page")
        # No Origin header: Chromium refuses DevTools WebSockets from origins it was not told of.
        self._ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"],
                                               timeout=timeout_s, suppress_origin=True)

    def send(self, method, **params):
        """Runs one DevTools command and returns its result; events meanwhile are recorded."""
        self._next_id += 1
        command_id = self._next_id
        self._ws.send(json.dumps({"id": command_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("id") == command_id:
                if "error" in message:
                    raise CdpError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._record(message)

    def _record(self, event):
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.messages.append((f"console.{params['type']}", text))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.messages.append(("exception", details.get("exception", {}).get(
                "description", details.get("text", ""))))
        elif method == "Log.entryAdded":
            entry = params["entry"]
            self.messages.append((f"log.{entry['level']}", entry["text"]))

    def evaluate(self, expression):
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise CdpError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, timeout_s=60):
        """Waits until `expression` is truthy in the page; False if `timeout_s` passes first."""
        return wait_until(lambda: bool(self.evaluate(expression)), timeout_s=timeout_s,
                          interval_s=0.1)

    def navigate(self, url, timeout_s=60):
        self.send("Page.navigate", url=url)
        if not self.wait_for("document.readyState === 'complete'", timeout_s):
            raise CdpError(f"{url} did not load")

    def type_into(self, selector, text):
        """Focuses the element and types `text` as keyboard input (replacing its value)."""
        self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                      f" e.focus(); if (e.select) e.select(); }})()")
        self.send("Input.insertText", text=text)

    def click(self, selector):
        """A real mouse click at the centre of the element."""
        box = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                            f".getBoundingClientRect(); return [r.x + r.width / 2,"
                            f" r.y + r.height / 2]; }})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left",
                      clickCount=1)

    def screenshot(self, path):
        """Saves the whole page as a PNG."""
        height = self.evaluate("document.documentElement.scrollHeight")
        width = self.evaluate("document.documentElement.scrollWidth")
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
        with open(path, "wb") as f:
            f.write(base64.b64decode(data["data"]))

    def close(self):
        if self._ws is not None:
            try:
                self.send("Browser.close")
            except (CdpError, OSError, websocket.WebSocketException):
                pass  # killed below
            self._ws.close()
            self._ws = None
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this Browser started
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self.proc.stderr.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
