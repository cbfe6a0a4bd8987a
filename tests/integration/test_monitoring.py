"""Monitoring assets against real tools: promtool checks the rules and their unit tests, and a real
Prometheus (Debian's `prometheus` package) scrapes a loaded dmdserve on loopback, so that every
PromQL expression of the Grafana dashboard is proven to return data from real series."""
import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import unittest
import urllib.parse
import urllib.request

import grpc

from harness import SOURCE_DIR, Server, pb, wait_until

DEPLOY = os.path.join(SOURCE_DIR, "deploy")
RULES = os.path.join(DEPLOY, "prometheus", "rules", "dmdserve.rules.yml")
DASHBOARD = os.path.join(DEPLOY, "grafana", "dashboards", "dmdserve.json")


def tool(name):
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is required (Debian package prometheus)")
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prometheus(config, tmp, log, attempts=5):
    """Prometheus on a free loopback port, ready: (process, port). A port found free can be taken
    by another test's connection before Prometheus binds it; then it starts again on another."""
    for attempt in range(attempts):
        port = free_port()
        prom = subprocess.Popen(
            [tool("prometheus"), f"--config.file={config}",
             f"--storage.tsdb.path={os.path.join(tmp, 'data')}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)

        def ready():
            try:
                return urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/-/ready", timeout=2).status == 200
            except OSError:
                return prom.poll() is not None  # exited: stop waiting

        if wait_until(ready, timeout_s=60) and prom.poll() is None:
            return prom, port
        prom.kill()
        prom.wait(30)
    return None, None


def dashboard_exprs():
    with open(DASHBOARD) as f:
        dash = json.load(f)
    return [(p["title"], t["expr"].replace("$model", ".*"),
             p.get("description", "").startswith("GPU only"))
            for p in dash["panels"] for t in p["targets"]]


class PromtoolTest(unittest.TestCase):
    def run_promtool(self, *args, cwd=None):
        r = subprocess.run([tool("promtool"), *args], capture_output=True, text=True, cwd=cwd)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_rules_are_valid_and_their_unit_tests_pass(self):
        self.run_promtool("check", "rules", RULES)
        self.run_promtool("test", "rules", "tests/dmdserve.rules.test.yml",
                          cwd=os.path.join(DEPLOY, "prometheus"))

    def test_scrape_config_is_valid(self):
        self.run_promtool("check", "config", os.path.join(DEPLOY, "prometheus", "prometheus.yml"))


class DashboardOnRealSeriesTest(unittest.TestCase):
    def test_every_dashboard_query_returns_data_from_a_loaded_server(self):
        exprs = dashboard_exprs()
        self.assertGreaterEqual(len(exprs), 10)
        with Server() as server, tempfile.TemporaryDirectory() as tmp:
            config = os.path.join(tmp, "prometheus.yml")
            with open(config, "w") as f:
                f.write(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{RULES}"]
scrape_configs:
  - job_name: dmdserve
    static_configs:
      - targets: ["127.0.0.1:{server.metrics_port}"]
""")
            log_path = os.path.join(tmp, "prometheus.log")
            log = open(log_path, "w")
            prom, port = start_prometheus(config, tmp, log)
            if prom is None:
                log.close()
                with open(log_path) as f:
                    self.fail("prometheus did not start:\n" + f.read())
            try:
                def api(path, **params):
                    url = f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(params)}"
                    with urllib.request.urlopen(url, timeout=10) as r:
                        return json.load(r)

                # Load for a while: successes, streams and a few errors.
                deadline = time.monotonic() + 12

                def load(i):
                    n = 0
                    while time.monotonic() < deadline:
                        try:
                            if n % 5 == 4:
                                server.stub.Generate(pb.GenerateRequest(prompt="x", model="nope"),
                                                     timeout=10)
                            elif n % 3 == 2:
                                list(server.stub.GenerateStream(
                                    pb.GenerateRequest(prompt=f"a coat {i}", num_images=2),
                                    timeout=30))
                            else:
                                server.stub.Generate(
                                    pb.GenerateRequest(prompt=f"a bag {i} {n}", num_images=1 + n % 3),
                                    timeout=30)
                        except grpc.RpcError:
                            pass
                        n += 1

                with concurrent.futures.ThreadPoolExecutor(8) as pool:
                    list(pool.map(load, range(8)))

                def has_data(expr):
                    result = api("/api/v1/query", query=expr)
                    return result["status"] == "success" and len(result["data"]["result"]) > 0

                def diagnosis():
                    targets = api("/api/v1/targets")["data"]["activeTargets"]
                    with open(log_path) as f:
                        prometheus_log = f.read()[-3000:]
                    return (f"server exit code: {server.proc.poll()}\n"
                            f"targets: {json.dumps(targets)}\n"
                            f"prometheus log (end):\n{prometheus_log}\n"
                            f"server log:\n{server.log()}")

                # Scraped at all? If not, say why once instead of timing out on every panel.
                self.assertTrue(wait_until(lambda: has_data('up{job="dmdserve"} == 1'),
                                           timeout_s=60), diagnosis())

                for title, expr, gpu_only in exprs:
                    with self.subTest(panel=title):
                        if gpu_only:  # this server runs on the CPU: the query must only be valid
                            self.assertEqual(api("/api/v1/query", query=expr)["status"], "success")
                            continue
                        self.assertTrue(wait_until(lambda: has_data(expr), timeout_s=30),
                                        f"no data for {expr}")
                # The recording rules evaluate on real series too.
                for record in ("dmdserve:generate_requests:rate5m",
                               "dmdserve:generate_latency_seconds:p99_5m",
                               "dmdserve:queue_saturation:ratio"):
                    self.assertTrue(wait_until(lambda: has_data(record), timeout_s=30), record)
                target = api("/api/v1/targets")["data"]["activeTargets"][0]
                self.assertEqual(target["health"], "up")
            finally:
                prom.terminate()
                prom.wait(30)
                log.close()


if __name__ == "__main__":
    unittest.main()
