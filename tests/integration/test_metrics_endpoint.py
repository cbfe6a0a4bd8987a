"""The /metrics endpoint where loaded libraries need a lot of thread-local storage.

glibc puts every loaded library's static TLS on each thread's stack. OpenBLAS built with OpenMP
needs 60 KiB of it; Debian's civetweb (prometheus-cpp's exposer) gives its threads 100 KiB stacks,
so with OpenBLAS as the system BLAS dmdserve used to exit at start-up. A preloaded library with
128 KiB of TLS reproduces that on any machine: a 100 KiB-stack thread cannot start beside it."""

import os
import subprocess
import tempfile
import unittest

from harness import Server


class LargeThreadLocalStorageTest(unittest.TestCase):
    def test_metrics_are_served_beside_a_library_with_128_kib_of_tls(self):
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "big_tls.c")
            library = os.path.join(tmp, "libbig_tls.so")
            with open(source, "w") as f:
                f.write("__thread char dmdserve_test_tls_block[128 * 1024];\n")
            subprocess.run(["cc", "-shared", "-fPIC", "-o", library, source], check=True)
            with Server(env={"LD_PRELOAD": library}) as server:
                text = server.metrics()
                self.assertIn("dmdserve_build_info", text)
                self.assertIn("dmdserve_model_ready", text)
                with open(f"/proc/{server.proc.pid}/maps") as maps:
                    self.assertIn(library, maps.read())  # the preload took effect


if __name__ == "__main__":
    unittest.main()
