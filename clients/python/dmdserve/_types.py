"""The results the clients return: plain, typed, immutable views of the API's messages.

Each type is built from its protobuf message by ``from_proto``; the field meanings are those of
proto/dmdserve/v1/dmdserve.proto. Images decode lazily: ``Image.pil`` and ``Image.png`` do their
work on first access and keep the result.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import io
import os
from typing import TYPE_CHECKING, Iterator, List, NamedTuple, Optional, Union

from .v1 import dmdserve_pb2 as pb

if TYPE_CHECKING:  # Pillow is imported on first use of Image.pil / Image.png
    import PIL.Image


class Encoding(enum.Enum):
    """How the server encodes images."""

    PNG = pb.IMAGE_ENCODING_PNG
    """A PNG file (8-bit grey or RGB, no alpha): the default."""
    RAW = pb.IMAGE_ENCODING_RAW
    """Raw pixels: uint8, height x width x channels, row-major, no header."""

    @classmethod
    def parse(cls, value: Union["Encoding", str]) -> "Encoding":
        """An Encoding from itself or its name, any case ("png", "raw")."""
        if isinstance(value, cls):
            return value
        try:
            return cls[str(value).upper()]
        except KeyError:
            raise ValueError(f"encoding must be 'png' or 'raw', got {value!r}") from None


class ImageSize(NamedTuple):
    """A (width, height) pair in pixels."""

    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class Timings:
    """Where a request's time went on the server, in seconds (see the proto's Timings)."""

    queue_seconds: float
    text_encoder_seconds: float
    generator_seconds: float
    decoder_seconds: float
    encode_seconds: float
    total_seconds: float
    batch_size: int
    """Images in the (largest) batch the request rode in, padding excluded."""

    @classmethod
    def from_proto(cls, t: pb.Timings) -> "Timings":
        return cls(t.queue_seconds, t.text_encoder_seconds, t.generator_seconds,
                   t.decoder_seconds, t.encode_seconds, t.total_seconds, t.batch_size)


@dataclasses.dataclass(frozen=True)
class Image:
    """One generated image.

    ``data`` holds the bytes as the server sent them (``encoding`` says which); ``png`` gives PNG
    bytes and ``pil`` a ``PIL.Image.Image`` whatever the encoding, both computed on first use.
    ``timings`` is set for streamed images only (a unary result has ``GenerateResult.timings``).
    """

    index: int
    seed: int
    width: int
    height: int
    channels: int
    encoding: Encoding
    data: bytes = dataclasses.field(repr=False)
    model: str = ""
    request_id: str = ""
    truncated_tokens: int = 0
    timings: Optional[Timings] = None

    @classmethod
    def from_proto(cls, m: pb.GeneratedImage, *, model: Optional[str] = None,
                   request_id: Optional[str] = None,
                   truncated_tokens: Optional[int] = None) -> "Image":
        """An Image from a GeneratedImage; the keyword arguments replace what a unary response
        carries once for all its images (a streamed image carries its own)."""
        return cls(index=m.index, seed=m.seed, width=m.width, height=m.height,
                   channels=m.channels, encoding=Encoding(m.encoding or pb.IMAGE_ENCODING_PNG),
                   data=m.data, model=m.model if model is None else model,
                   request_id=m.request_id if request_id is None else request_id,
                   truncated_tokens=(m.truncated_tokens if truncated_tokens is None
                                     else truncated_tokens),
                   timings=Timings.from_proto(m.timings) if m.HasField("timings") else None)

    @functools.cached_property
    def pil(self) -> "PIL.Image.Image":
        """The image as a PIL image (mode "L" for grey, "RGB" for colour), decoded once."""
        from PIL import Image as PilImage

        if self.encoding is Encoding.PNG:
            image = PilImage.open(io.BytesIO(self.data))
            image.load()
            return image
        mode = {1: "L", 3: "RGB"}.get(self.channels)
        if mode is None:
            raise ValueError(f"cannot make a PIL image of {self.channels} channels")
        return PilImage.frombytes(mode, (self.width, self.height), self.data)

    @functools.cached_property
    def png(self) -> bytes:
        """The image as PNG bytes: ``data`` itself for PNG, else encoded here once."""
        if self.encoding is Encoding.PNG:
            return self.data
        out = io.BytesIO()
        self.pil.save(out, format="PNG")
        return out.getvalue()

    @property
    def size(self) -> ImageSize:
        """(width, height) in pixels."""
        return ImageSize(self.width, self.height)

    def save(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Writes the image to `path` as PNG."""
        with open(path, "wb") as f:
            f.write(self.png)


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    """All images of one Generate call, in index order, with the request's timings.

    Iterating, ``len()`` and indexing go over ``images``.
    """

    images: List[Image]
    model: str
    """The model that served the request (resolved when the request named none)."""
    request_id: str
    timings: Timings
    truncated_tokens: int
    """Prompt tokens dropped by the model's token limit (0 when the prompt fit)."""

    @classmethod
    def from_proto(cls, r: pb.GenerateResponse) -> "GenerateResult":
        images = [Image.from_proto(m, model=r.model, request_id=r.request_id,
                                   truncated_tokens=r.truncated_tokens) for m in r.images]
        return cls(images, r.model, r.request_id, Timings.from_proto(r.timings),
                   r.truncated_tokens)

    @property
    def seeds(self) -> List[int]:
        """The seed of each image (the request's seed + index)."""
        return [image.seed for image in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[Image]:
        return iter(self.images)

    def __getitem__(self, index: int) -> Image:
        return self.images[index]


@dataclasses.dataclass(frozen=True)
class BatchThroughput:
    """Throughput measured at warm-up for one batch size."""

    batch_size: int
    images_per_second: float


@dataclasses.dataclass(frozen=True)
class DeviceBatching:
    """The largest batch a model's workers on one device take, and the measurement behind it."""

    device: str
    max_batch_size: int
    measured: List[BatchThroughput]
    """Empty when the server's --max_batch_size set the size instead of a measurement."""

    @classmethod
    def from_proto(cls, b: pb.DeviceBatching) -> "DeviceBatching":
        return cls(b.device, b.max_batch_size,
                   [BatchThroughput(m.batch_size, m.images_per_second) for m in b.measured])


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A served model, as ListModels describes it."""

    name: str
    width: int
    height: int
    channels: int
    steps: int
    """Generator evaluations per image (1 for one-step DMD models)."""
    is_default: bool
    max_images_per_request: int
    ready: bool
    supported_sizes: List[ImageSize]
    """Sizes the model accepts, the default first."""
    max_tokens: int
    description: str
    batching: List[DeviceBatching]
    """Per device; empty until the model is ready."""

    @classmethod
    def from_proto(cls, m: pb.ModelInfo) -> "ModelInfo":
        return cls(m.name, m.width, m.height, m.channels, m.steps, m.is_default,
                   m.max_images_per_request, m.ready,
                   [ImageSize(s.width, s.height) for s in m.supported_sizes], m.max_tokens,
                   m.description, [DeviceBatching.from_proto(b) for b in m.batching])


@dataclasses.dataclass(frozen=True)
class TokenizeResult:
    """A prompt tokenized exactly as the model's pipeline does."""

    ids: List[int]
    """Ids of the whole text, without BOS/EOS and without truncation."""
    tokens: List[str]
    """The vocabulary string of each id (byte-level BPE form; "</w>" ends a word)."""
    input_ids: List[int]
    """What the text encoder receives: BOS + ids cut to max_tokens - 2 + EOS + padding."""
    truncated_tokens: int
    model: str

    @classmethod
    def from_proto(cls, r: pb.TokenizeResponse) -> "TokenizeResult":
        return cls(list(r.ids), list(r.tokens), list(r.input_ids), r.truncated_tokens, r.model)
