"""Typed exceptions, one per gRPC status code.

Every failed call raises a subclass of :class:`DmdserveError` carrying the status ``code`` and the
server's ``message`` unchanged (dmdserve's messages name the offending field and its limit). The
mapping is 1:1 with ``grpc.StatusCode``; the README's "Status codes" table says when the server
returns each one.

Two classes also derive from the matching built-in, so generic handlers work:
:class:`InvalidArgumentError` is a ``ValueError`` and :class:`DeadlineExceededError` is a
``TimeoutError``.
"""
from __future__ import annotations

from typing import Dict, Optional, Type

import grpc


class DmdserveError(Exception):
    """A call failed with a gRPC status other than OK.

    Attributes:
        code: the gRPC status code.
        message: the status message as the server (or the gRPC runtime) wrote it.
    """

    #: The status code this class stands for (the base class: any code without a subclass).
    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None) -> None:
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.message: str = message
        super().__init__(f"{self.code.name}: {message}")


class CancelledError(DmdserveError):
    """CANCELLED: the call was cancelled (by the caller, or by the server's drain)."""

    default_code = grpc.StatusCode.CANCELLED


class UnknownError(DmdserveError):
    """UNKNOWN: an error without a more specific status."""

    default_code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(DmdserveError, ValueError):
    """INVALID_ARGUMENT: a bad request field; the message names it and its limit."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(DmdserveError, TimeoutError):
    """DEADLINE_EXCEEDED: the call's deadline passed before it completed."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(DmdserveError):
    """NOT_FOUND: an unknown model; the message lists the served ones."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(DmdserveError):
    """ALREADY_EXISTS."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(DmdserveError):
    """PERMISSION_DENIED."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(DmdserveError):
    """RESOURCE_EXHAUSTED: the model's queue is full or the API key is over its rate limit.

    Retried by the client (see :class:`dmdserve.RetryPolicy`); raised once the retries are spent.
    """

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(DmdserveError):
    """FAILED_PRECONDITION."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(DmdserveError):
    """ABORTED."""

    default_code = grpc.StatusCode.ABORTED


class OutOfRangeError(DmdserveError):
    """OUT_OF_RANGE."""

    default_code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(DmdserveError):
    """UNIMPLEMENTED: the server does not have this method."""

    default_code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(DmdserveError):
    """INTERNAL: the model failed on the batch (details are in the server's log only)."""

    default_code = grpc.StatusCode.INTERNAL


class UnavailableError(DmdserveError):
    """UNAVAILABLE: the server is unreachable, still warming up, or draining.

    Retried by the client (see :class:`dmdserve.RetryPolicy`); raised once the retries are spent.
    """

    default_code = grpc.StatusCode.UNAVAILABLE


class DataLossError(DmdserveError):
    """DATA_LOSS."""

    default_code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(DmdserveError):
    """UNAUTHENTICATED: the server requires an API key and the call had none, or an unknown one."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: Dict[grpc.StatusCode, Type[DmdserveError]] = {
    cls.default_code: cls
    for cls in (CancelledError, UnknownError, InvalidArgumentError, DeadlineExceededError,
                NotFoundError, AlreadyExistsError, PermissionDeniedError, ResourceExhaustedError,
                FailedPreconditionError, AbortedError, OutOfRangeError, UnimplementedError,
                InternalError, UnavailableError, DataLossError, UnauthenticatedError)
}


def error_for(code: grpc.StatusCode, message: str) -> DmdserveError:
    """The exception for a status: the code's subclass, or the base class for a code without one."""
    return _BY_CODE.get(code, DmdserveError)(message, code)


def from_rpc_error(error: grpc.RpcError) -> DmdserveError:
    """Converts a grpc.RpcError (sync or asyncio) into the typed exception, keeping its message."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return error_for(code, details or str(error))
