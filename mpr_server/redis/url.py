"""Parsing of REDIS_URL, REDIS_NODES and REDIS_NATMAP."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

DEFAULT_PORT = 6379


class Address(NamedTuple):
    """A Redis node address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RedisURL:
    """A parsed ``redis://`` or ``rediss://`` (TLS) URL."""

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    @property
    def address(self) -> Address:
        return Address(self.host, self.port)

    def redacted(self) -> str:
        """The URL with the password hidden, for logs and error messages."""
        scheme = "rediss" if self.tls else "redis"
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:***@"
        return f"{scheme}://{auth}{self.address}/{self.db}"


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{what}: port must be a number from 1 to 65535, got {text!r}")
    return int(text)


def parse_redis_url(url: str) -> RedisURL:
    """Parse ``redis://[[user]:password@]host[:port][/db]``; ``rediss://`` means TLS.

    Anything else (another scheme, a query string, a user without a password, a
    bad port or db) is a ValueError naming the problem (never echoing the password).
    """
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in ("redis", "rediss"):
        raise ValueError(
            f"Redis URL must start with redis:// or rediss://, got {scheme + sep if sep else 'no scheme'!r}"
        )
    if "?" in rest or "#" in rest:
        raise ValueError("Redis URL: query strings and fragments are not supported")
    try:
        parts = urlsplit(f"redis://{rest}")
        host = parts.hostname
        # the text after the host ("]" ends an IPv6 literal), e.g. ":6380"
        after_host = parts.netloc.rpartition("@")[2].rpartition("]")[2]
        port_text = after_host.rpartition(":")[2] if ":" in after_host else ""
    except ValueError as e:
        raise ValueError(f"Redis URL is malformed: {e}") from None
    if not host:
        raise ValueError("Redis URL has no host")
    port = _port(port_text, "Redis URL") if port_text else DEFAULT_PORT
    path = parts.path.strip("/")
    if path and (not path.isdigit() or len(path) > 5):
        raise ValueError(f"Redis URL: database must be a non-negative number, got {path!r}")
    db = int(path) if path else 0
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if username is not None and password is None:
        raise ValueError("Redis URL has a user name but no password; for a password alone use redis://:PASSWORD@host")
    if password == "":
        password = None
    return RedisURL(host=host, port=port, db=db, username=username, password=password, tls=scheme.lower() == "rediss")


_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]\s]+)):(?P<port>\d+)$")


def parse_address(text: str, what: str = "address") -> Address:
    """Parse ``host:port`` (``[v6]:port`` for IPv6)."""
    match = _HOST_PORT.match(text.strip())
    if not match:
        raise ValueError(f"{what}: expected host:port, got {text.strip()!r}")
    host = match.group("v6") or match.group("host")
    return Address(host, _port(match.group("port"), what))


def parse_nodes(text: str) -> tuple[Address, ...]:
    """Parse REDIS_NODES: ``host:port,host:port,...`` (at least one)."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise ValueError(f"REDIS_NODES: expected host:port,host:port,... got {text!r}")
    return tuple(parse_address(item, "REDIS_NODES") for item in items)


_NAT_ITEM = re.compile(
    r"^(?P<a>\[[0-9A-Fa-f:.]+\]|[^:\[\]\s]+):(?P<ap>\d+):(?P<r>\[[0-9A-Fa-f:.]+\]|[^:\[\]\s]+):(?P<rp>\d+)$"
)


def parse_natmap(text: str) -> dict[Address, Address]:
    """Parse REDIS_NATMAP: ``announcedHost:announcedPort:reachableHost:reachablePort,...``.

    An empty string is an empty map.
    """
    result: dict[Address, Address] = {}
    if not text.strip():
        return result
    for item in text.split(","):
        match = _NAT_ITEM.match(item.strip())
        if not match:
            raise ValueError(
                f"REDIS_NATMAP: expected announcedHost:announcedPort:reachableHost:reachablePort, got {item.strip()!r}"
            )
        announced = Address(match.group("a").strip("[]"), _port(match.group("ap"), "REDIS_NATMAP"))
        reachable = Address(match.group("r").strip("[]"), _port(match.group("rp"), "REDIS_NATMAP"))
        if announced in result and result[announced] != reachable:
            raise ValueError(f"REDIS_NATMAP: {announced} is mapped twice")
        result[announced] = reachable
    return result
