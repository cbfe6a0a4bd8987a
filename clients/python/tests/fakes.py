"""Test doubles for the client's unit tests: a scripted gRPC channel (blocking and asyncio), an
RpcError with a status, and a manual clock. Integration tests use the real server instead."""
from __future__ import annotations

import io
from typing import Any, Callable, Dict, List, Optional

import grpc
from PIL import Image as PilImage

from dmdserve.v1 import dmdserve_pb2 as pb


class FakeRpcError(grpc.RpcError):
    """What a failed call raises: a status code and details, like grpc's own errors."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class ManualClock:
    """A monotonic clock that moves only when told (sleep() moves it, and records the sleep)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: List[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeStream:
    """The iterator a unary-stream call returns: yields `items`, raising those that are errors."""

    def __init__(self, items: List[Any]) -> None:
        self._items = list(items)
        self.cancelled = False

    def __iter__(self) -> "FakeStream":
        return self

    def __next__(self) -> Any:
        if not self._items:
            raise StopIteration
        item = self._items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def __aiter__(self) -> "FakeStream":
        return self

    async def __anext__(self) -> Any:
        try:
            return self.__next__()
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class Call:
    """One recorded call: method path, request, timeout and metadata."""

    def __init__(self, method: str, request: Any, timeout: Optional[float], metadata: Any) -> None:
        self.method, self.request, self.timeout, self.metadata = method, request, timeout, metadata


class FakeChannel:
    """A channel whose methods answer from a script: `script[method]` is a list consumed one
    entry per call; a unary entry is a response or an exception to raise, a stream entry a list of
    messages and exceptions. With aio=True calls return awaitables, as grpc.aio's do."""

    def __init__(self, script: Dict[str, List[Any]], aio: bool = False) -> None:
        self.script = script
        self.aio = aio
        self.calls: List[Call] = []
        self.streams: List[FakeStream] = []

    def _record(self, method: str, request: Any, timeout: Optional[float], metadata: Any) -> Any:
        self.calls.append(Call(method.rsplit("/", 1)[-1], request, timeout, metadata))
        return self.script[method.rsplit("/", 1)[-1]].pop(0)

    def unary_unary(self, method: str, **_: Any) -> Callable[..., Any]:
        def invoke(request: Any, timeout: Optional[float] = None, metadata: Any = None) -> Any:
            answer = self._record(method, request, timeout, metadata)
            if self.aio:
                return _awaitable(answer)
            if isinstance(answer, BaseException):
                raise answer
            return answer
        return invoke

    def unary_stream(self, method: str, **_: Any) -> Callable[..., FakeStream]:
        def invoke(request: Any, timeout: Optional[float] = None,
                   metadata: Any = None) -> FakeStream:
            stream = FakeStream(self._record(method, request, timeout, metadata))
            self.streams.append(stream)
            return stream
        return invoke

    def close(self) -> None:
        pass


async def _awaitable(answer: Any) -> Any:
    if isinstance(answer, BaseException):
        raise answer
    return answer


def png_bytes(width: int = 4, height: int = 2, value: int = 7) -> bytes:
    out = io.BytesIO()
    PilImage.new("L", (width, height), value).save(out, format="PNG")
    return out.getvalue()


def generated_image(index: int, seed: int, **fields: Any) -> pb.GeneratedImage:
    fields.setdefault("data", png_bytes())
    return pb.GeneratedImage(index=index, seed=seed, width=4, height=2, channels=1,
                             encoding=pb.IMAGE_ENCODING_PNG, **fields)
