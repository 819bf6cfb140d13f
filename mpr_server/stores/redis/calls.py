"""Calls to Redis on the store's behalf: a script on one connection's keys, or one command;
Redis failures become ``StoreUnavailable``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mpr_server.errors import StoreUnavailable
from mpr_server.redis import RedisClient, RedisError, Script
from mpr_server.stores.redis.keys import connection_keys


async def run_script(
    redis: RedisClient, script: Script, connection_id: str, args: Sequence[Any], *, replicas: int = 0
) -> Any:
    """Run ``script`` on the connection's keys; with ``replicas``, only succeed once that many
    replicas have the change (REDIS_WAIT_REPLICAS)."""
    try:
        return await redis.eval_script(
            script,
            connection_keys(connection_id),
            [str(a) if isinstance(a, int) else a for a in args],
            replicas=replicas,
        )
    except RedisError as e:
        raise StoreUnavailable(f"Redis: {e}") from e


async def execute(redis: RedisClient, args: Sequence[Any], key: str) -> Any:
    try:
        return await redis.execute(args, key=key)
    except RedisError as e:
        raise StoreUnavailable(f"Redis: {e}") from e
