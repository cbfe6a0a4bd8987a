"""dmdserve's exceptions: one class per gRPC status code, the server's message kept."""
import unittest

import grpc

import dmdserve
from dmdserve._errors import error_for, from_rpc_error
from fakes import FakeRpcError


class ErrorsTest(unittest.TestCase):
    def test_every_status_code_but_ok_has_its_own_class(self):
        classes = set()
        for code in grpc.StatusCode:
            if code is grpc.StatusCode.OK:
                continue
            with self.subTest(code=code.name):
                error = error_for(code, "why")
                self.assertIs(error.code, code)
                self.assertEqual(error.message, "why")
                self.assertIsInstance(error, dmdserve.DmdserveError)
                self.assertIsNot(type(error), dmdserve.DmdserveError)
                self.assertIs(type(error).default_code, code)
                self.assertIs(getattr(dmdserve, type(error).__name__), type(error))  # exported
                classes.add(type(error))
        self.assertEqual(len(classes), len(grpc.StatusCode) - 1)

    def test_the_named_classes_stand_for_their_codes(self):
        cases = {
            dmdserve.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
            dmdserve.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
            dmdserve.NotFoundError: grpc.StatusCode.NOT_FOUND,
            dmdserve.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
            dmdserve.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
            dmdserve.UnavailableError: grpc.StatusCode.UNAVAILABLE,
            dmdserve.CancelledError: grpc.StatusCode.CANCELLED,
            dmdserve.InternalError: grpc.StatusCode.INTERNAL,
        }
        for cls, code in cases.items():
            with self.subTest(cls=cls.__name__):
                self.assertIsInstance(error_for(code, ""), cls)

    def test_builtin_bases_for_generic_handlers(self):
        self.assertIsInstance(error_for(grpc.StatusCode.INVALID_ARGUMENT, "x"), ValueError)
        self.assertIsInstance(error_for(grpc.StatusCode.DEADLINE_EXCEEDED, "x"), TimeoutError)
        self.assertNotIsInstance(error_for(grpc.StatusCode.NOT_FOUND, "x"), ValueError)

    def test_conversion_keeps_the_servers_message_and_names_the_code(self):
        error = from_rpc_error(FakeRpcError(grpc.StatusCode.NOT_FOUND,
                                            "model 'x' is not served; models: tiny-random"))
        self.assertIsInstance(error, dmdserve.NotFoundError)
        self.assertEqual(error.message, "model 'x' is not served; models: tiny-random")
        self.assertEqual(str(error), "NOT_FOUND: model 'x' is not served; models: tiny-random")

    def test_an_rpc_error_without_a_status_becomes_unknown(self):
        error = from_rpc_error(grpc.RpcError("bare"))
        self.assertIs(error.code, grpc.StatusCode.UNKNOWN)
        self.assertEqual(error.message, "bare")


if __name__ == "__main__":
    unittest.main()
