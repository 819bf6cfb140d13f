"""The cold tier: payloads of messages older than THRESHOLD_TIMESTAMP move to MongoDB, their
metadata stays in Redis (so queue order, leases and counts never span two systems), and the
``Persister`` does it on a timer in every instance (work claimed per bucket, no leader)."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mpr_server._async import gather
from mpr_server.errors import StoreUnavailable
from mpr_server.metrics import Metrics
from mpr_server.redis import RedisClient
from mpr_server.stores.mongo.cold import ColdMessage, ColdStore
from mpr_server.stores.redis import replies
from mpr_server.stores.redis import scripts as lua
from mpr_server.stores.redis.calls import execute, run_script
from mpr_server.stores.redis.claims import Claims
from mpr_server.stores.redis.indexes import IndexWriter
from mpr_server.stores.redis.keys import BUCKETS, old_key, split_entry
from mpr_server.stores.redis.replies import as_text


class Tiering:
    def __init__(
        self, redis: RedisClient, cold: ColdStore, indexes: IndexWriter, claims: Claims, threshold_ms: int
    ) -> None:
        self._redis = redis
        self._cold = cold
        self._indexes = indexes
        self._claims = claims
        self._threshold_ms = threshold_ms

    @property
    def threshold_ms(self) -> int:
        return self._threshold_ms

    async def persist_once(self, now_ms: int, batch: int = 200) -> int:
        """Move payloads older than the threshold to MongoDB; returns how many moved. Idempotent and
        safe to interrupt anywhere: Mongo upsert first, then the Redis body is dropped only if the
        message is still there, then the index entry goes."""
        await self._indexes.write()
        moved = 0
        for n in range(BUCKETS):
            async with self._claims.claimed(f"old:{{{n}}}", 30_000) as claimed:
                if claimed:
                    moved += await self._persist_bucket(old_key(n), now_ms - self._threshold_ms, batch)
        return moved

    async def _persist_bucket(self, key: str, older_than_ms: int, batch: int) -> int:
        entries = await execute(self._redis, ["ZRANGEBYSCORE", key, "-inf", older_than_ms, "LIMIT", 0, batch], key)
        if not entries:
            return 0
        found: list[tuple[str, ColdMessage]] = []
        gone: list[str] = []
        for entry in map(as_text, entries):
            connection_id, message_id = split_entry(entry)
            read = replies.offload_read(await run_script(self._redis, lua.OFFLOAD_READ, connection_id, [message_id]))
            if read is None:
                gone.append(entry)
                continue
            found.append(
                (entry, ColdMessage(message_id, connection_id, read.recipient_dids, read.body, read.received_at_ms))
            )
        await self._cold.save([m for _, m in found])
        await self.before_offload_done()
        removed_meanwhile = []
        for entry, m in found:
            if not replies.flag(await run_script(self._redis, lua.OFFLOAD_DONE, m.connection_id, [m.message_id])):
                removed_meanwhile.append(m.message_id)
            gone.append(entry)
        await self._cold.delete(removed_meanwhile)
        await execute(self._redis, ["ZREM", key, *gone], key)
        return len(found)

    async def oldest_ms(self) -> int | None:
        """receivedAt of the oldest message in the persister's index (its payload still in Redis;
        a removed message's entry stays until the persister passes it)."""
        firsts = await gather(
            [execute(self._redis, ["ZRANGE", old_key(n), 0, 0, "WITHSCORES"], old_key(n)) for n in range(BUCKETS)]
        )
        scores = []
        for first in firsts:
            if isinstance(first, Failure):
                raise StoreUnavailable(f"Redis index read failed: {first.getErrorMessage()}")
            if first:
                scores.append(int(float(as_text(first[1]))))
        return min(scores) if scores else None

    async def before_offload_done(self) -> None:
        """A seam for fault-injection tests: runs between the MongoDB write and the Redis removal."""


class Persister(Service):
    """Runs the move to MongoDB every ``interval_s`` in every instance, the first time one
    interval after start. A failing tick logs; the next one retries. Stopping waits for the
    tick under way."""

    _log = Logger()

    def __init__(
        self, tiering: Tiering, clock: IReactorTime, interval_s: float, metrics: Metrics | None = None
    ) -> None:
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._interval_s = interval_s
        self._stopped: Deferred[LoopingCall] | None = None
        self.metrics = metrics if metrics is not None else Metrics("redis")
        self._clock = clock
        self._tiering = tiering

    def startService(self) -> None:
        super().startService()
        self._stopped = self._loop.start(self._interval_s, now=False)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        stopped, self._stopped = self._stopped, None
        return stopped.addCallback(lambda _: None) if stopped is not None else None

    async def _tick(self) -> None:
        now = self._clock.seconds()
        try:
            moved = await self._tiering.persist_once(int(now * 1000))
            self.metrics.persister_moved.inc(moved)
            self._measure(now, await self._tiering.oldest_ms())
        except Exception as e:
            self.metrics.persister_errors.inc()
            self._log.warn("persister tick failed, the next tick retries: {error}", error=f"{type(e).__name__}: {e}")
            return
        if moved:
            self._log.debug("persisted {moved} messages to MongoDB", moved=moved)

    def _measure(self, now: float, oldest_ms: int | None) -> None:
        if oldest_ms is None:
            self.metrics.persister_lag.set(0)
            self.metrics.oldest_message_age.set(0)
            return
        age_s = max(0.0, now - oldest_ms / 1000)
        self.metrics.oldest_message_age.set(age_s)
        self.metrics.persister_lag.set(max(0.0, age_s - self._tiering.threshold_ms / 1000))
