"""gRPC channels to a dmdserve server: plaintext, TLS, or mutual TLS.

The server speaks TLS when started with --tls_cert_file/--tls_key_file and asks for a client
certificate when also given --tls_client_ca_file (README, "Server flags").
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Sequence, Tuple, Union

import grpc
import grpc.aio

#: A channel option, as grpc takes them: ("grpc.some_option", value).
ChannelOption = Tuple[str, Union[int, str]]
PathLike = Union[str, "os.PathLike[str]"]

#: Responses carry images: gRPC's 4 MiB default receive limit is lifted (a few raw 512x512 images
#: exceed it). The server caps its responses with --max_send_message_bytes.
DEFAULT_OPTIONS: Tuple[ChannelOption, ...] = (("grpc.max_receive_message_length", -1),)


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """TLS settings of a client. The files are PEM and are read when the client is created.

    Attributes:
        ca_file: CA bundle to verify the server's certificate with; None: the system's roots.
            The target's host name must match the certificate (or set `server_name`).
        cert_file, key_file: the client's certificate chain and key, for servers started with
            --tls_client_ca_file (mutual TLS); both or neither.
        server_name: the name to check the server's certificate against instead of the target's
            host (for tests and for connecting by IP address).
    """

    ca_file: Optional[PathLike] = None
    cert_file: Optional[PathLike] = None
    key_file: Optional[PathLike] = None
    server_name: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TlsConfig: set both cert_file and key_file, or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials, the files read now."""
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca_file),
                                            private_key=_read(self.key_file),
                                            certificate_chain=_read(self.cert_file))

    def options(self) -> List[ChannelOption]:
        """Channel options these settings need."""
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []


def _read(path: Optional[PathLike]) -> Optional[bytes]:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def _options(tls: Optional[TlsConfig], options: Sequence[ChannelOption]) -> List[ChannelOption]:
    return [*DEFAULT_OPTIONS, *(tls.options() if tls else []), *options]


def make_channel(target: str, tls: Optional[TlsConfig],
                 options: Sequence[ChannelOption] = ()) -> grpc.Channel:
    """A blocking-API channel to `target` ("host:port" or any gRPC target URI)."""
    if tls is None:
        return grpc.insecure_channel(target, options=_options(None, options))
    return grpc.secure_channel(target, tls.credentials(), options=_options(tls, options))


def make_aio_channel(target: str, tls: Optional[TlsConfig],
                     options: Sequence[ChannelOption] = ()) -> grpc.aio.Channel:
    """An asyncio channel to `target`; create it inside the event loop that uses it."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=_options(None, options))
    return grpc.aio.secure_channel(target, tls.credentials(), options=_options(tls, options))
