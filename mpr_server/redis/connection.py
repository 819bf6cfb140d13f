"""How to reach a Redis node: connection settings, verified TLS, a no-delay TCP endpoint, and
the conversion of txredisapi's replies (internal to mpr_server.redis)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import txredisapi
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS, platformTrust
from zope.interface import implementer

from .errors import RedisResponseError
from .url import Address

Arg = str | bytes | int | float


@dataclass(frozen=True)
class TLSOptions:
    """Verified TLS: the server certificate must chain to ``trust_root`` (default: the
    platform's CA store) and match the host name we connect to."""

    trust_root: Any = None  # IOpenSSLTrustRoot, e.g. ssl.Certificate.loadPEM(...)
    client_certificate: Any = None  # ssl.PrivateCertificate for mutual TLS

    def connection_creator(self, host: str) -> Any:
        return optionsForClientTLS(
            host,
            trustRoot=self.trust_root if self.trust_root is not None else platformTrust(),
            clientCertificate=self.client_certificate,
        )


@dataclass(frozen=True)
class ConnectionSettings:
    """How to connect to every node (the same for all nodes of a cluster)."""

    password: str | None = field(default=None, repr=False)
    username: str | None = None
    db: int = 0
    tls: TLSOptions | None = None
    pool_size: int = 4
    connect_timeout: float = 5.0
    reconnect_max_delay: float = 2.0
    decode_responses: bool = True
    ping_interval: float | None = 15.0


@implementer(IStreamClientEndpoint)
class _NoDelayEndpoint:
    """TCP endpoint whose connections have Nagle's algorithm off: commands are small and
    pipelined, and must not wait for the ACK of the previous one."""

    def __init__(self, inner: IStreamClientEndpoint) -> None:
        self._inner = inner

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def no_delay(protocol: IProtocol) -> IProtocol:
            set_no_delay = getattr(getattr(protocol, "transport", None), "setTcpNoDelay", None)
            if set_no_delay is not None:
                set_no_delay(True)
            return protocol

        return self._inner.connect(protocolFactory).addCallback(no_delay)


def make_endpoint(reactor: Any, address: Address, settings: ConnectionSettings) -> IStreamClientEndpoint:
    endpoint: IStreamClientEndpoint = _NoDelayEndpoint(
        HostnameEndpoint(reactor, address.host, address.port, timeout=settings.connect_timeout)
    )
    if settings.tls is not None:
        endpoint = wrapClientTLS(settings.tls.connection_creator(address.host), endpoint)
    return endpoint


def to_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def convert_reply(reply: Any) -> Any:
    """Replace txredisapi's error objects nested in a reply (EXEC, Lua tables) with ours."""
    if isinstance(reply, list):
        return [convert_reply(item) for item in reply]
    if isinstance(reply, txredisapi.ResponseError):
        return RedisResponseError(str(reply))
    return reply


def encode_command(args: Sequence[Arg]) -> bytes:
    """One command in RESP (what txredisapi's ``_build_command`` does, without its layers)."""
    parts = [b"*%d\r\n" % len(args)]
    append = parts.append
    for arg in args:
        data: bytes
        kind = type(arg)
        if kind is bytes:
            data = cast(bytes, arg)
        elif kind is str:
            data = cast(str, arg).encode()
        elif kind is int:
            data = b"%d" % cast(int, arg)
        elif kind is float:
            data = format(arg, "f").encode()
        elif isinstance(arg, bytes):
            data = bytes(arg)
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            raise ValueError(f"cannot send {kind.__name__} to Redis")
        append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


ASKING = encode_command(["ASKING"])


def command_name(args: Sequence[Arg]) -> str:
    return to_text(args[0]).upper() if args else "?"
