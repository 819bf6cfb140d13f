"""The shared indexes written shortly after the scripts they follow, in batches: lease ends for
the redelivery sweep (``mpr:due:{n}``), message ages for the persister (``mpr:old:{n}``) and the
message TTL (``mpr:age:{n}``). A lost index write only delays work, it never loses a message;
a failed batch is queued again."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mpr_server._async import Batcher, background, gather
from mpr_server.errors import StoreUnavailable
from mpr_server.model import NewMessage
from mpr_server.redis import RedisClient
from mpr_server.stores.redis import scripts as lua
from mpr_server.stores.redis.keys import age_key, bucket, due_key, index_entry, old_key

INDEX_BATCH_S = 0.05  # index entries are written at most this long after their script


@dataclass(frozen=True)
class _LeaseEnd:
    connection_id: str
    until_ms: int


@dataclass(frozen=True)
class _Aged:
    key: str
    received_at_ms: int
    entry: str


_Entry = _LeaseEnd | _Aged


class IndexWriter:
    _log = Logger()

    def __init__(self, redis: RedisClient, clock: IReactorTime, message_ttl: bool) -> None:
        self._redis = redis
        self._clock = clock
        self._message_ttl = message_ttl
        self._batch: Batcher[_Entry] = Batcher(clock, INDEX_BATCH_S, self._write_later)

    def lease_ends(self, connection_id: str, until_ms: int) -> None:
        """Record a lease end for the sweeper."""
        self._batch.add(_LeaseEnd(connection_id, until_ms))

    def message_added(self, message: NewMessage) -> None:
        """Record a message for the persister and the TTL."""
        entry = index_entry(message.connection_id, message.id)
        n = bucket(message.connection_id)
        self._batch.add(_Aged(old_key(n), message.received_at_ms, entry))
        if self._message_ttl:
            self._batch.add(_Aged(age_key(n), message.received_at_ms, entry))

    def message_imported(self, connection_id: str, message_id: str, received_at_ms: int, body_here: bool) -> None:
        """Record a message imported from an original deployment: for the persister if its body
        is in Redis, and for the TTL."""
        entry = index_entry(connection_id, message_id)
        n = bucket(connection_id)
        if body_here:
            self._batch.add(_Aged(old_key(n), received_at_ms, entry))
        if self._message_ttl:
            self._batch.add(_Aged(age_key(n), received_at_ms, entry))

    def _write_later(self, entries: list[_Entry]) -> Deferred[None]:
        return background(self._write_or_retry(entries), self._log, "index write failed")

    async def _write_or_retry(self, entries: list[_Entry]) -> None:
        try:
            await self._write(entries)
        except StoreUnavailable as e:
            self._log.warn("{error}; retrying", error=str(e))

    async def write(self) -> None:
        """Write what is waiting now (before reading the indexes, and at stop)."""
        await self._write(self._batch.take())

    def cancel(self) -> None:
        self._batch.cancel()

    async def _write(self, entries: list[_Entry]) -> None:
        if not entries:
            return
        zadds: defaultdict[str, list[Any]] = defaultdict(list)
        due: defaultdict[int, dict[str, int]] = defaultdict(dict)
        for e in entries:
            if isinstance(e, _Aged):
                zadds[e.key].extend([e.received_at_ms, e.entry])
            else:
                ends = due[bucket(e.connection_id)]
                ends[e.connection_id] = min(ends.get(e.connection_id, e.until_ms), e.until_ms)
        now = int(self._clock.seconds() * 1000)
        writes: list[Coroutine[Any, Any, Any]] = [
            self._redis.execute(["ZADD", key, *args], key=key) for key, args in zadds.items()
        ]
        for n, ends in due.items():
            pairs = [x for item in ends.items() for x in item]
            writes.append(self._redis.eval_script(lua.INDEX_LEASES, [due_key(n)], [now, *pairs]))
        results = await gather(writes)
        if any(isinstance(r, Failure) for r in results):
            self._batch.extend(entries)
            raise StoreUnavailable("Redis index write failed")
