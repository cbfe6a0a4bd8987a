"""Request messages built from the clients' arguments, checked where protobuf could not carry them.

The server validates every field and answers INVALID_ARGUMENT naming it; the checks here cover only
what cannot be sent at all (wrong types, numbers outside the wire type's range, a malformed size)
and raise the same :class:`InvalidArgumentError`, naming the argument.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Tuple, Union

from ._errors import InvalidArgumentError
from ._types import Encoding, ImageSize
from .v1 import dmdserve_pb2 as pb

#: A size: (width, height), an ImageSize, or "WxH" (e.g. "64x32").
Size = Union[ImageSize, Tuple[int, int], Sequence[int], str]

_INT32_MAX = 2**31 - 1
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidArgumentError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _check_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{name} must be a str, got {type(value).__name__}")
    return value


def parse_size(size: Optional[Size]) -> ImageSize:
    """(width, height) from a size argument; None: (0, 0), the model's default size."""
    if size is None:
        return ImageSize(0, 0)
    if isinstance(size, str):
        m = _SIZE_RE.match(size)
        if not m:
            raise InvalidArgumentError(f"size must be 'WIDTHxHEIGHT' (e.g. '64x32'), got {size!r}")
        width, height = int(m.group(1)), int(m.group(2))
    else:
        try:
            width, height = size
        except (TypeError, ValueError):
            raise InvalidArgumentError(
                f"size must be (width, height) or 'WIDTHxHEIGHT', got {size!r}") from None
    return ImageSize(_check_int("size width", width, 0, _INT32_MAX),
                     _check_int("size height", height, 0, _INT32_MAX))


def generate_request(prompt: str, n: int = 1, *, seed: Optional[int] = None,
                     size: Optional[Size] = None, model: Optional[str] = None,
                     encoding: Union[Encoding, str] = Encoding.PNG,
                     request_id: Optional[str] = None) -> pb.GenerateRequest:
    """The GenerateRequest for the clients' generate()/stream() arguments (see Client.generate)."""
    width, height = parse_size(size)
    try:
        wire_encoding = Encoding.parse(encoding).value
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None
    request = pb.GenerateRequest(
        model=_check_str("model", model or ""), prompt=_check_str("prompt", prompt),
        num_images=_check_int("n", n, 1, _INT32_MAX), width=width, height=height,
        encoding=wire_encoding, request_id=_check_str("request_id", request_id or ""))
    if seed is not None:
        request.seed = _check_int("seed", seed, 0, 2**64 - 1)
    return request


def tokenize_request(text: str, model: Optional[str] = None) -> pb.TokenizeRequest:
    """The TokenizeRequest for Client.tokenize's arguments."""
    return pb.TokenizeRequest(model=_check_str("model", model or ""),
                              text=_check_str("text", text))


def auth_metadata(api_key: Optional[str]) -> Tuple[Tuple[str, str], ...]:
    """The call metadata carrying `api_key` (`authorization: Bearer KEY`); empty without a key."""
    if api_key is None or api_key == "":
        return ()
    if not isinstance(api_key, str) or any(c in api_key for c in "\r\n"):
        raise ValueError("api_key must be a str without line breaks")
    return (("authorization", f"Bearer {api_key}"),)
