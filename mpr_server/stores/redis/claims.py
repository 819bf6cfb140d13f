"""Claims on shared work (sweeping a bucket, moving a batch): instances share periodic work
without a leader, each claiming a piece for a bounded time."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mpr_server.redis import RedisClient, RedisError
from mpr_server.stores.redis import scripts as lua
from mpr_server.stores.redis.calls import execute
from mpr_server.stores.redis.keys import lock_key


class Claims:
    def __init__(self, redis: RedisClient, instance_id: str) -> None:
        self._redis = redis
        self._instance_id = instance_id

    @asynccontextmanager
    async def claimed(self, work: str, ttl_ms: int) -> AsyncIterator[bool]:
        """Claim ``work`` for at most ``ttl_ms``; yields whether we got it, and gives it back
        when done. Raises StoreUnavailable if Redis does not answer the claim."""
        lock = lock_key(work)
        token = f"{self._instance_id}/{os.urandom(6).hex()}"
        claimed = bool(await execute(self._redis, ["SET", lock, token, "NX", "PX", ttl_ms], lock))
        try:
            yield claimed
        finally:
            if claimed:
                try:
                    await self._redis.eval_script(lua.UNLOCK, [lock], [token])
                except RedisError:
                    pass  # it expires by itself
