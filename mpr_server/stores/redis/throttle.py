"""The push throttle shared by every instance."""

from __future__ import annotations

from mpr_server.redis import RedisClient
from mpr_server.stores.redis.keys import push_key


class RedisThrottle:
    """At most one push per key per window across every instance: ``SET NX PX``."""

    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis

    async def acquire(self, key: str, window_ms: int) -> bool:
        if window_ms <= 0:
            return True
        name = push_key(key)
        return bool(await self._redis.execute(["SET", name, "1", "NX", "PX", window_ms], key=name))
