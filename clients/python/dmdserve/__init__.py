"""dmdserve: Python client of the dmdserve text-to-image server.

    import dmdserve

    with dmdserve.Client("localhost:50051") as client:
        result = client.generate("a photo of a sneaker", n=4, seed=42)
        for image in result:
            image.save(f"sneaker-{image.seed}.png")      # or image.pil, image.png
        print(result.timings.total_seconds)

:class:`Client` (blocking) and :class:`AsyncClient` (asyncio) have the same methods: generate,
stream, models, tokenize. Failures raise :class:`DmdserveError` subclasses, one per gRPC status;
RESOURCE_EXHAUSTED and UNAVAILABLE are retried per :class:`RetryPolicy` within the call's timeout.
The generated protobuf/gRPC modules are ``dmdserve.v1.dmdserve_pb2`` and ``dmdserve_pb2_grpc``.
"""
from ._aio import AsyncClient
from ._channel import TlsConfig
from ._client import DEFAULT_TIMEOUT_S, Client
from ._errors import (AbortedError, AlreadyExistsError, CancelledError, DataLossError,
                      DeadlineExceededError, DmdserveError, FailedPreconditionError,
                      InternalError, InvalidArgumentError, NotFoundError, OutOfRangeError,
                      PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError,
                      UnavailableError, UnimplementedError, UnknownError, error_for)
from ._request import Size
from ._retry import NO_RETRY, RetryPolicy
from ._types import (BatchThroughput, DeviceBatching, Encoding, GenerateResult, Image, ImageSize,
                     ModelInfo, Timings, TokenizeResult)

__version__ = "0.1.0"

__all__ = [
    "AbortedError", "AlreadyExistsError", "AsyncClient", "BatchThroughput", "CancelledError",
    "Client", "DEFAULT_TIMEOUT_S", "DataLossError", "DeadlineExceededError", "DeviceBatching",
    "DmdserveError", "Encoding", "FailedPreconditionError", "GenerateResult", "Image", "ImageSize",
    "InternalError", "InvalidArgumentError", "ModelInfo", "NO_RETRY", "NotFoundError",
    "OutOfRangeError", "PermissionDeniedError", "ResourceExhaustedError", "RetryPolicy", "Size",
    "Timings", "TlsConfig", "TokenizeResult", "UnauthenticatedError", "UnavailableError",
    "UnimplementedError", "UnknownError", "error_for",
]
