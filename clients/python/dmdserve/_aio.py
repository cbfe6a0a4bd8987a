"""AsyncClient: the asyncio twin of Client, on grpc.aio, with the same methods and semantics."""
from __future__ import annotations

from typing import AsyncGenerator, AsyncIterator, List, Optional, Sequence, Union

import grpc.aio

from . import _retry
from ._channel import ChannelOption, TlsConfig, make_aio_channel
from ._client import DEFAULT_TIMEOUT_S
from ._request import Size, auth_metadata, generate_request, tokenize_request
from ._retry import RetryPolicy
from ._types import Encoding, GenerateResult, Image, ModelInfo, TokenizeResult
from .v1 import dmdserve_pb2 as pb
from .v1 import dmdserve_pb2_grpc as pb_grpc


class AsyncClient:
    """An asyncio client of one dmdserve server.

    The arguments are those of :class:`Client` (`channel` being a grpc.aio channel). Create it
    inside the event loop that uses it (gRPC's asyncio channels belong to one loop), and close it
    with ``await client.close()`` or ``async with``. Backoff sleeps are asyncio.sleep, so waiting
    retries never block the loop; cancelling the task cancels the call in flight.
    """

    def __init__(self, target: str, api_key: Optional[str] = None,
                 tls: Optional[TlsConfig] = None, *, retry: RetryPolicy = RetryPolicy(),
                 options: Sequence[ChannelOption] = (),
                 channel: Optional[grpc.aio.Channel] = None) -> None:
        self.target = target
        self.retry = retry
        self._metadata = auth_metadata(api_key)
        self._owns_channel = channel is None
        self._channel = channel if channel is not None else make_aio_channel(target, tls, options)
        self._stub = pb_grpc.ImageGenerationStub(self._channel)

    async def generate(self, prompt: str, n: int = 1, *, seed: Optional[int] = None,
                       size: Optional[Size] = None, model: Optional[str] = None,
                       encoding: Union[Encoding, str] = Encoding.PNG,
                       request_id: Optional[str] = None,
                       timeout: Optional[float] = DEFAULT_TIMEOUT_S) -> GenerateResult:
        """Generates `n` images of `prompt` (Generate RPC); see Client.generate."""
        request = generate_request(prompt, n, seed=seed, size=size, model=model,
                                   encoding=encoding, request_id=request_id)
        response = await _retry.call_async(
            "Generate",
            lambda t: self._stub.Generate(request, timeout=t, metadata=self._metadata),
            self.retry, timeout)
        return GenerateResult.from_proto(response)

    def stream(self, prompt: str, n: int = 1, *, seed: Optional[int] = None,
               size: Optional[Size] = None, model: Optional[str] = None,
               encoding: Union[Encoding, str] = Encoding.PNG, request_id: Optional[str] = None,
               timeout: Optional[float] = DEFAULT_TIMEOUT_S) -> AsyncIterator[Image]:
        """Yields each image as it arrives (GenerateStream RPC): ``async for image in
        client.stream(...)``. Arguments are checked now; see Client.stream for the rest."""
        request = generate_request(prompt, n, seed=seed, size=size, model=model,
                                   encoding=encoding, request_id=request_id)
        messages = _retry.stream_async(
            "GenerateStream",
            lambda t: self._stub.GenerateStream(request, timeout=t, metadata=self._metadata),
            self.retry, timeout)
        return _images(messages)

    async def models(self, *, timeout: Optional[float] = DEFAULT_TIMEOUT_S) -> List[ModelInfo]:
        """The models the server serves (ListModels RPC)."""
        response = await _retry.call_async(
            "ListModels",
            lambda t: self._stub.ListModels(pb.ListModelsRequest(), timeout=t,
                                            metadata=self._metadata),
            self.retry, timeout)
        return [ModelInfo.from_proto(m) for m in response.models]

    async def tokenize(self, text: str, *, model: Optional[str] = None,
                       timeout: Optional[float] = DEFAULT_TIMEOUT_S) -> TokenizeResult:
        """Tokenizes `text` as `model`'s pipeline does (Tokenize RPC); None: the default model."""
        request = tokenize_request(text, model)
        response = await _retry.call_async(
            "Tokenize",
            lambda t: self._stub.Tokenize(request, timeout=t, metadata=self._metadata),
            self.retry, timeout)
        return TokenizeResult.from_proto(response)

    async def close(self) -> None:
        """Closes the channel (unless it was passed in); calls in flight are cancelled."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.target!r})"


async def _images(messages: AsyncGenerator[pb.GeneratedImage, None]) -> AsyncIterator[Image]:
    """The Images of a GenerateStream; closing this generator closes (cancels) `messages`."""
    try:
        async for message in messages:
            yield Image.from_proto(message)
    finally:
        await messages.aclose()
