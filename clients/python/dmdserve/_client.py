"""Client: the blocking dmdserve client (see AsyncClient in _aio.py for the asyncio twin)."""
from __future__ import annotations

import contextlib
from typing import Generator, Iterator, List, Optional, Sequence, Union

import grpc

from . import _retry
from ._channel import ChannelOption, TlsConfig, make_channel
from ._request import Size, auth_metadata, generate_request, tokenize_request
from ._retry import RetryPolicy
from ._types import Encoding, GenerateResult, Image, ModelInfo, TokenizeResult
from .v1 import dmdserve_pb2 as pb
from .v1 import dmdserve_pb2_grpc as pb_grpc

#: Default time for a whole call, retries included, in seconds.
DEFAULT_TIMEOUT_S = 60.0


class Client:
    """A blocking client of one dmdserve server.

    Args:
        target: the server, "host:port" or any gRPC target URI (e.g. "dns:///dmdserve:50051").
        api_key: sent as `authorization: Bearer KEY` on every call, for servers started with
            --api_keys_file; None: no key.
        tls: None for plaintext, or a :class:`TlsConfig` (CA bundle, optional client certificate
            and key for mutual TLS).
        retry: how refused calls are retried (:class:`RetryPolicy`; ``NO_RETRY`` to turn off).
        options: extra gRPC channel options, e.g. [("grpc.lb_policy_name", "round_robin")].
        channel: a channel to use instead of making one from `target`, `tls` and `options`; the
            client does not close it.

    Every method takes ``timeout``: seconds for the whole call, all attempts included (None: no
    deadline). Failures raise :class:`DmdserveError` subclasses, one per gRPC status code.

    Thread safety: a Client may be shared by threads (gRPC channels are thread-safe). Close it
    with close() or use it as a context manager.
    """

    def __init__(self, target: str, api_key: Optional[str] = None,
                 tls: Optional[TlsConfig] = None, *, retry: RetryPolicy = RetryPolicy(),
                 options: Sequence[ChannelOption] = (),
                 channel: Optional[grpc.Channel] = None) -> None:
        self.target = target
        self.retry = retry
        self._metadata = auth_metadata(api_key)
        self._owns_channel = channel is None
        self._channel = channel if channel is not None else make_channel(target, tls, options)
        self._stub = pb_grpc.ImageGenerationStub(self._channel)

    def generate(self, prompt: str, n: int = 1, *, seed: Optional[int] = None,
                 size: Optional[Size] = None, model: Optional[str] = None,
                 encoding: Union[Encoding, str] = Encoding.PNG, request_id: Optional[str] = None,
                 timeout: Optional[float] = DEFAULT_TIMEOUT_S) -> GenerateResult:
        """Generates `n` images of `prompt` and returns them all at once (Generate RPC).

        Args:
            prompt: the text prompt (UTF-8; prompts past the model's 77 tokens are cut, and the
                result's ``truncated_tokens`` says by how much).
            n: number of images, at least 1 and at most the model's max_images_per_request.
            seed: seed of image 0; image i uses seed + i (mod 2**64). None: the server draws one
                and returns it with each image.
            size: (width, height) or "WxH", a size the model supports; None: its default.
            model: a served model's name; None: the server's default model.
            encoding: Encoding.PNG (default) or Encoding.RAW ("png"/"raw").
            request_id: echoed in the result and the server's log; at most 128 printable ASCII.
            timeout: seconds for the whole call including retries; None: no deadline.

        Returns:
            A GenerateResult: the images in index order (each with its seed, PNG bytes and a
            lazily decoded PIL image), the model, the server's timings and truncated_tokens.
        """
        request = generate_request(prompt, n, seed=seed, size=size, model=model,
                                   encoding=encoding, request_id=request_id)
        response = _retry.call(
            "Generate",
            lambda t: self._stub.Generate(request, timeout=t, metadata=self._metadata),
            self.retry, timeout)
        return GenerateResult.from_proto(response)

    def stream(self, prompt: str, n: int = 1, *, seed: Optional[int] = None,
               size: Optional[Size] = None, model: Optional[str] = None,
               encoding: Union[Encoding, str] = Encoding.PNG, request_id: Optional[str] = None,
               timeout: Optional[float] = DEFAULT_TIMEOUT_S) -> Iterator[Image]:
        """Yields each image as soon as the server has it (GenerateStream RPC).

        Images may arrive in any order; each carries its ``index``, ``seed`` and own ``timings``.
        The arguments are those of generate(); they are checked now, and the call starts when
        iteration does (``timeout`` counts from there). A stream that fails before its first image
        is retried like a unary call; after one, an error ends it. Closing the iterator (or
        leaving a ``for`` loop early and dropping it) cancels the call.
        """
        request = generate_request(prompt, n, seed=seed, size=size, model=model,
                                   encoding=encoding, request_id=request_id)
        messages = _retry.stream(
            "GenerateStream",
            lambda t: self._stub.GenerateStream(request, timeout=t, metadata=self._metadata),
            self.retry, timeout)
        return _images(messages)

    def models(self, *, timeout: Optional[float] = DEFAULT_TIMEOUT_S) -> List[ModelInfo]:
        """The models the server serves (ListModels RPC)."""
        response = _retry.call(
            "ListModels",
            lambda t: self._stub.ListModels(pb.ListModelsRequest(), timeout=t,
                                            metadata=self._metadata),
            self.retry, timeout)
        return [ModelInfo.from_proto(m) for m in response.models]

    def tokenize(self, text: str, *, model: Optional[str] = None,
                 timeout: Optional[float] = DEFAULT_TIMEOUT_S) -> TokenizeResult:
        """Tokenizes `text` as `model`'s pipeline does (Tokenize RPC); None: the default model."""
        request = tokenize_request(text, model)
        response = _retry.call(
            "Tokenize",
            lambda t: self._stub.Tokenize(request, timeout=t, metadata=self._metadata),
            self.retry, timeout)
        return TokenizeResult.from_proto(response)

    def close(self) -> None:
        """Closes the channel (unless it was passed in); calls in flight are cancelled."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"


def _images(messages: Generator[pb.GeneratedImage, None, None]) -> Iterator[Image]:
    """The Images of a GenerateStream; closing this generator closes (cancels) `messages`."""
    with contextlib.closing(messages):
        for message in messages:
            yield Image.from_proto(message)
