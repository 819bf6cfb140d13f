"""The liveness of MPR instances: each refreshes a deadline in ``mpr:instances`` every TTL/3
and reads who else is alive. Sessions and leases of an instance missing from the list are dead
and released by the scripts that meet them."""

from __future__ import annotations

import orjson
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mpr_server._async import background
from mpr_server.redis import RedisClient, RedisError
from mpr_server.stores.redis.keys import INSTANCES
from mpr_server.stores.redis.replies import as_text

FORGET_AFTER_MS = 3_600_000  # entries of instances gone this long are deleted


class Liveness:
    _log = Logger()

    def __init__(self, redis: RedisClient, clock: IReactorTime, instance_id: str, ttl_ms: int) -> None:
        self._redis = redis
        self._clock = clock
        self.instance_id = instance_id
        self.ttl_ms = ttl_ms
        self._live_json = orjson.dumps([instance_id]).decode()
        self._heartbeat = LoopingCall(lambda: background(self.beat(), self._log, "liveness heartbeat failed"))
        self._heartbeat.clock = clock

    def live(self, now_ms: int) -> tuple[str, int]:
        """The JSON list of live instances and the cutoff the scripts take: a session or lease
        made after the cutoff counts as alive (its instance may be too new for our list)."""
        return self._live_json, now_ms - 2 * self.ttl_ms

    async def start(self) -> None:
        await self.beat()
        self._heartbeat.start(self.ttl_ms / 3000, now=False)

    async def stop(self) -> None:
        if self._heartbeat.running:
            self._heartbeat.stop()
        try:
            await self._redis.execute(["ZREM", INSTANCES, self.instance_id], key=INSTANCES)
        except RedisError:
            pass

    async def beat(self) -> None:
        """Refresh our deadline and read who else is alive."""
        now = int(self._clock.seconds() * 1000)
        try:
            await self._redis.execute(["ZADD", INSTANCES, now + self.ttl_ms, self.instance_id], key=INSTANCES)
            live = await self._redis.execute(["ZRANGEBYSCORE", INSTANCES, now, "+inf"], key=INSTANCES)
            await self._redis.execute(["ZREMRANGEBYSCORE", INSTANCES, "-inf", now - FORGET_AFTER_MS], key=INSTANCES)
        except RedisError as e:
            self._log.warn("liveness heartbeat failed: {error}", error=str(e))
            return
        names = sorted({as_text(name) for name in live} | {self.instance_id})
        self._live_json = orjson.dumps(names).decode()
