"""Building a Redis client from settings: a single server or a cluster."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.interfaces import IReactorTime

from .base import RedisClient
from .cluster import ClusterRedisClient
from .single import SingleRedisClient
from .url import Address


def client_from_settings(
    reactor: IReactorTime,
    *,
    url: str | None = None,
    cluster_nodes: Sequence[Address] | None = None,
    natmap: dict[Address, Address] | None = None,
    **options: Any,
) -> RedisClient:
    """Build a single-server client from a URL or a cluster client from node
    addresses (REDIS_NODES); options are passed to the client's constructor."""
    if cluster_nodes:
        return ClusterRedisClient(reactor, cluster_nodes, natmap=natmap or {}, **options)
    if url is None:
        raise ValueError("either a Redis URL or cluster nodes are needed")
    return SingleRedisClient(reactor, url, **options)
