"""A typed Redis façade (single server and Redis Cluster) over txredisapi.

Nothing outside this package imports txredisapi: the stores use `RedisClient`.
"""

from .base import MessageCallback, ReconnectCallback, RedisClient, Subscription
from .cluster import ClusterRedisClient
from .connection import TLSOptions
from .errors import RedisError, RedisNotConnected, RedisNotReplicated, RedisResponseError, RedisUnavailable
from .factory import client_from_settings
from .script import Script
from .single import SingleRedisClient
from .slots import key_slot
from .url import Address, RedisURL, parse_natmap, parse_nodes, parse_redis_url

__all__ = [
    "Address",
    "ClusterRedisClient",
    "MessageCallback",
    "ReconnectCallback",
    "RedisClient",
    "RedisError",
    "RedisNotConnected",
    "RedisNotReplicated",
    "RedisResponseError",
    "RedisURL",
    "RedisUnavailable",
    "Script",
    "SingleRedisClient",
    "Subscription",
    "TLSOptions",
    "client_from_settings",
    "key_slot",
    "parse_natmap",
    "parse_nodes",
    "parse_redis_url",
]
