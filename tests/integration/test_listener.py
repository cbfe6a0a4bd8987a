"""The gRPC listener: reflection really off when --reflection=false, a metadata limit above
what proxies pass on, a port that a second server cannot share, and a listener stopped by the
open-file limit that ends in a restartable exit instead of a server that no longer accepts.

Reflection is called raw (the Python gRPC packages here have no reflection stubs): a
ServerReflectionRequest with `list_services` set (field 7, an empty string) is the two bytes
0x3a 0x00, and the response lists the services.
"""
import os
import resource
import socket
import subprocess
import unittest

import grpc

from harness import Server, pb, pb_grpc

REFLECTION_METHOD = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
LIST_SERVICES = b"\x3a\x00"


def list_services(server):
    """The raw ServerReflectionResponse bytes of one list_services request."""
    call = server.channel.stream_stream(REFLECTION_METHOD, request_serializer=None,
                                        response_deserializer=None)
    return next(call(iter([LIST_SERVICES]), timeout=10))


class ReflectionTest(unittest.TestCase):
    def test_on_by_default_lists_the_service(self):
        server = Server()
        try:
            response = list_services(server)
            self.assertIn(b"dmdserve.v1.ImageGeneration", response)
        finally:
            self.assertEqual(server.stop(), 0, server.log())

    def test_off_is_unimplemented(self):
        server = Server("--reflection=false")
        try:
            with self.assertRaises(grpc.RpcError) as caught:
                list_services(server)
            self.assertEqual(caught.exception.code(), grpc.StatusCode.UNIMPLEMENTED)
        finally:
            self.assertEqual(server.stop(), 0, server.log())


class MetadataLimitTest(unittest.TestCase):
    """Request headers up to 64 KiB (more than proxies pass on by default) are served, with a
    neighbour call on the same connection unaffected; over it, the call fails with
    RESOURCE_EXHAUSTED (and gRPC 1.51 closes the connection, which server.h documents)."""

    def test_large_metadata_is_served_beside_a_neighbour(self):
        server = Server("--max_batch_size=1")
        try:
            neighbour = server.stub.Generate.future(
                pb.GenerateRequest(prompt="a cat", num_images=8, seed=1), timeout=60)
            for size in (17 << 10, 60 << 10):  # over gRPC's default 8 KiB; Envoy's default
                models = server.stub.ListModels(pb.ListModelsRequest(), timeout=10,
                                                metadata=[("x-pad", "a" * size)]).models
                self.assertEqual([m.name for m in models], ["tiny-random"])
            self.assertEqual(len(neighbour.result().images), 8)
        finally:
            self.assertEqual(server.stop(), 0, server.log())

    def test_metadata_over_the_limit_fails_the_call(self):
        server = Server()
        try:
            with self.assertRaises(grpc.RpcError) as caught:
                server.stub.ListModels(pb.ListModelsRequest(), timeout=10,
                                       metadata=[("x-pad", "a" * (65 << 10))])
            self.assertEqual(caught.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
            # The server keeps serving, on a new connection: the transport closes the old one, and
            # a call sent on it before the client notices fails with UNAVAILABLE.
            with grpc.insecure_channel(server.target,
                                       options=[("grpc.use_local_subchannel_pool", 1)]) as fresh:
                stub = pb_grpc.ImageGenerationStub(fresh)
                self.assertTrue(stub.ListModels(pb.ListModelsRequest(), timeout=10).models)
        finally:
            self.assertEqual(server.stop(), 0, server.log())


class PortTest(unittest.TestCase):
    def test_a_second_server_on_a_used_port_fails_at_start_up(self):
        first = Server()
        try:
            second = Server(f"--port={first.port}", wait_ready=False)
            try:
                code = second.proc.wait(60)
            except subprocess.TimeoutExpired:
                second.proc.kill()  # it started on the shared port: the bug this test pins
                code = second.proc.wait()
                self.fail("a second server started on the first one's port")
            finally:
                second.close()
            self.assertNotEqual(code, 0, second.log())
            self.assertIn(f"cannot listen for gRPC on 127.0.0.1:{first.port}", second.log())
            self.assertIn("ports are not shared", second.log())
            # The first server still serves.
            models = first.stub.ListModels(pb.ListModelsRequest(), timeout=10).models
            self.assertEqual([m.name for m in models], ["tiny-random"])
        finally:
            self.assertEqual(first.stop(), 0, first.log())


class FdLimitTest(unittest.TestCase):
    def test_a_listener_stopped_by_the_fd_limit_drains_and_exits_1(self):
        # gRPC 1.51 stops accepting for good once accept4 fails with EMFILE. The server must not
        # carry on as a process that looks alive and takes no connection: it drains and exits 1.
        server = Server()
        sockets = []
        try:
            in_use = len(os.listdir(f"/proc/{server.proc.pid}/fd"))
            limit = in_use + 16
            resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (limit, limit))
            for _ in range(48):  # the kernel completes these; the server accepts until EMFILE
                sockets.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
            try:
                code = server.proc.wait(60)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
                self.fail("the server kept running with a listener that accepts no connection\n"
                          + server.log())
        finally:
            for s in sockets:
                s.close()
            server.close()
        self.assertEqual(code, 1, server.log())
        self.assertIn("the gRPC listener stopped accepting connections (Too many open files); "
                      "draining and exiting with status 1", server.log())


if __name__ == "__main__":
    unittest.main()
