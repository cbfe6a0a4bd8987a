"""TLS on the gRPC and HTTP ports: server certificates, client certificates (mTLS), certificates
renewed while serving, clear start-up errors for wrong files, and the plaintext warning. Certificates are
made in the test with the openssl command (EC P-256, valid for a day)."""
import base64
import os
import shutil
import subprocess
import tempfile
import time
import unittest

import http.client
import json
import ssl

import grpc
from dmdserve.v1 import dmdserve_pb2_grpc as pb_grpc

from harness import Server, pb, run_dmdctl, wait_until


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1",
            "-subj", f"/CN={name}", cwd=directory)


def make_cert(directory, name, ca, san="DNS:localhost,IP:127.0.0.1"):
    """A key and certificate `name` signed by `ca`, for the given subjectAltName."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
    with open(os.path.join(directory, f"{name}.ext"), "w") as f:
        f.write(f"subjectAltName={san}\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext",
            cwd=directory)


class TlsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.dir = cls.tmp.name
        for ca in ("server-ca", "other-ca", "client-ca"):
            make_ca(d, ca)
        make_cert(d, "server", "server-ca")
        make_cert(d, "renewed", "other-ca")
        make_cert(d, "client", "client-ca", san="DNS:client")
        make_cert(d, "stranger", "other-ca", san="DNS:stranger")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def path(self, name):
        return os.path.join(self.dir, name)

    def read(self, name):
        with open(self.path(name), "rb") as f:
            return f.read()

    def channel(self, server, ca="server-ca", client=None):
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.read(f"{ca}.pem"),
            private_key=self.read(f"{client}.key") if client else None,
            certificate_chain=self.read(f"{client}.pem") if client else None)
        return grpc.secure_channel(f"localhost:{server.port}", creds)

    def list_models(self, channel):
        stub = pb_grpc.ImageGenerationStub(channel)
        return [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models]

    def tls_server(self, *flags, cert="server"):
        return Server(f"--tls_cert_file={self.path(cert + '.pem')}",
                      f"--tls_key_file={self.path(cert + '.key')}", *flags)

    def test_tls_serves_tls_clients_only(self):
        server = self.tls_server()
        try:
            self.assertIn("gRPC and HTTP ports: TLS", server.log())
            with self.channel(server) as channel:
                self.assertEqual(self.list_models(channel), ["tiny-random"])
            with self.assertRaises(grpc.RpcError) as caught:  # plaintext client
                server.stub.ListModels(pb.ListModelsRequest(), timeout=5)
            self.assertEqual(caught.exception.code(), grpc.StatusCode.UNAVAILABLE)
            with self.assertRaises(grpc.RpcError):  # a client that trusts another CA
                with self.channel(server, ca="other-ca") as channel:
                    self.list_models(channel)
            ok = run_dmdctl(f"--tls_ca_file={self.path('server-ca.pem')}", "models",
                            target=f"localhost:{server.port}")
            self.assertEqual(ok.returncode, 0, ok.stderr)
            self.assertIn("tiny-random", ok.stdout)
        finally:
            self.assertEqual(server.stop(), 0, server.log())

    def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(self):
        server = self.tls_server(f"--tls_client_ca_file={self.path('client-ca.pem')}")
        try:
            self.assertIn("with client certificates (mTLS)", server.log())
            with self.channel(server, client="client") as channel:
                self.assertEqual(self.list_models(channel), ["tiny-random"])
            for client in (None, "server"):  # none, or one the client CA did not sign
                with self.subTest(client=client):
                    with self.assertRaises(grpc.RpcError) as caught:
                        with self.channel(server, client=client) as channel:
                            self.list_models(channel)
                    self.assertEqual(caught.exception.code(), grpc.StatusCode.UNAVAILABLE)
            ok = run_dmdctl(f"--tls_ca_file={self.path('server-ca.pem')}",
                            f"--tls_cert_file={self.path('client.pem')}",
                            f"--tls_key_file={self.path('client.key')}", "models",
                            target=f"localhost:{server.port}")
            self.assertEqual(ok.returncode, 0, ok.stderr)
        finally:
            self.assertEqual(server.stop(), 0, server.log())

    def renewable_server(self):
        """A server whose certificate files live in their own directory, checked every second."""
        live = tempfile.mkdtemp(dir=self.dir)
        for ext in ("pem", "key"):
            shutil.copy(self.path(f"server.{ext}"), os.path.join(live, f"server.{ext}"))
        return live, Server(f"--tls_cert_file={live}/server.pem",
                            f"--tls_key_file={live}/server.key", "--tls_refresh_s=1")

    def renew(self, live):
        """Replaces the files in `live` with the renewed certificate (signed by other-ca)."""
        for ext in ("key", "pem"):  # write then rename, as cert-manager does
            shutil.copy(self.path(f"renewed.{ext}"), os.path.join(live, f"new.{ext}"))
            os.replace(os.path.join(live, f"new.{ext}"), os.path.join(live, f"server.{ext}"))

    def test_a_renewed_certificate_is_used_without_dropping_connections(self):
        live, server = self.renewable_server()
        try:
            old = self.channel(server)
            self.assertEqual(self.list_models(old), ["tiny-random"])
            self.renew(live)

            def renewed_works():
                try:
                    with self.channel(server, ca="other-ca") as channel:
                        return self.list_models(channel) == ["tiny-random"]
                except grpc.RpcError:
                    return False

            self.assertTrue(wait_until(renewed_works, timeout_s=20, interval_s=0.5))
            self.assertEqual(self.list_models(old), ["tiny-random"])  # the open connection
            old.close()
        finally:
            self.assertEqual(server.stop(), 0, server.log())

    def https(self, server, path="/v1/models", body=None, ca="server-ca", client=None):
        """(status, parsed body, the server certificate's issuer CN) of one HTTPS request."""
        context = ssl.create_default_context(cafile=self.path(f"{ca}.pem"))
        if client:
            context.load_cert_chain(self.path(f"{client}.pem"), self.path(f"{client}.key"))
        connection = http.client.HTTPSConnection("localhost", server.http_port, context=context,
                                                 timeout=60)
        try:
            connection.request("POST" if body else "GET", path,
                               body=json.dumps(body) if body else None)
            issuer = dict(x[0] for x in connection.sock.getpeercert()["issuer"])["commonName"]
            response = connection.getresponse()
            return response.status, json.loads(response.read()), issuer
        finally:
            connection.close()

    def test_https_serves_tls_clients_only(self):
        server = self.tls_server()
        try:
            self.assertIn("gRPC and HTTP ports: TLS", server.log())
            status, body, _ = self.https(server)
            self.assertEqual((status, [m["id"] for m in body["data"]]), (200, ["tiny-random"]))
            status, body, _ = self.https(server, "/v1/images/generations",
                                         {"prompt": "a boot", "seed": 3})
            self.assertEqual(status, 200, body)
            with self.channel(server) as channel:  # the same image as over gRPC
                image = pb_grpc.ImageGenerationStub(channel).Generate(
                    pb.GenerateRequest(prompt="a boot", seed=3), timeout=60).images[0].data
            self.assertEqual(base64.b64decode(body["data"][0]["b64_json"]), image)
            plain = http.client.HTTPConnection("localhost", server.http_port, timeout=10)
            with self.assertRaises((ConnectionError, http.client.HTTPException)):
                plain.request("GET", "/v1/models")
                plain.getresponse().read()
            plain.close()
            with self.assertRaises(ssl.SSLError):  # a client that trusts another CA
                self.https(server, ca="other-ca")
        finally:
            self.assertEqual(server.stop(), 0, server.log())

    def test_https_mutual_tls_requires_a_client_certificate_from_the_client_ca(self):
        server = self.tls_server(f"--tls_client_ca_file={self.path('client-ca.pem')}")
        try:
            status, body, _ = self.https(server, client="client")
            self.assertEqual(status, 200, body)
            for client in (None, "stranger"):  # none, or one the client CA did not sign
                with self.subTest(client=client):
                    status, body, _ = self.https(server, client=client)
                    self.assertEqual(status, 401, body)
                    self.assertIn("client certificate", body["error"]["message"])
        finally:
            self.assertEqual(server.stop(), 0, server.log())

    def test_https_uses_a_renewed_certificate(self):
        live, server = self.renewable_server()
        try:
            self.assertEqual(self.https(server)[2], "server-ca")
            self.renew(live)

            def renewed_served():
                try:
                    return self.https(server, ca="other-ca")[:1] == (200,)
                except ssl.SSLError:
                    return False

            self.assertTrue(wait_until(renewed_served, timeout_s=20, interval_s=0.5))
            self.assertIn("HTTPS: certificate files reloaded", server.log())
        finally:
            self.assertEqual(server.stop(), 0, server.log())

    def test_wrong_files_are_start_up_errors_naming_the_flag(self):
        cases = [
            ([f"--tls_cert_file={self.path('server.pem')}",
              f"--tls_key_file={self.path('client.key')}"],
             "--tls_key_file=", "the key does not belong to the certificate"),
            ([f"--tls_cert_file={self.path('server.pem')}"], "--tls_cert_file and --tls_key_file",
             "set both"),
            ([f"--tls_cert_file={self.path('server.ext')}",
              f"--tls_key_file={self.path('server.key')}"], "--tls_cert_file=",
             "no PEM certificate"),
            ([f"--tls_client_ca_file={self.path('client-ca.pem')}"], "--tls_client_ca_file",
             "needs TLS"),
        ]
        for flags, flag, text in cases:
            with self.subTest(flag=flag, text=text):
                server = Server(*flags, wait_ready=False)
                started = time.monotonic()
                code = server.proc.wait(60)
                server.close()
                self.assertNotEqual(code, 0)
                self.assertIn(flag, server.log())
                self.assertIn(text, server.log())
                self.assertLess(time.monotonic() - started, 30)  # before loading any model

    def test_plaintext_beyond_loopback_is_warned_about(self):
        exposed = Server("--listen_host=0.0.0.0")
        local = Server()
        try:
            self.assertIn("listening on 0.0.0.0 without TLS", exposed.log())
            self.assertIn("listening on 0.0.0.0 without API keys", exposed.log())
            self.assertNotIn("without TLS", local.log())
            self.assertNotIn("without API keys", local.log())
        finally:
            self.assertEqual(exposed.stop(), 0, exposed.log())
            self.assertEqual(local.stop(), 0, local.log())


if __name__ == "__main__":
    unittest.main()
