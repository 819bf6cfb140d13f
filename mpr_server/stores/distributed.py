"""The distributed store: Redis (hot queues, leases, sessions, notifications) + MongoDB (payloads
of old messages), shared by any number of MPR instances.

Every change to a connection is one Lua script on its hash-tagged keys (see redis_scripts).
Around them this module keeps three small Redis indexes; the last two are written in batches
shortly after the scripts they follow (a lost index write only delays work, it never loses a
message):

- ``mpr:instances``: ZSET instance -> liveness deadline (heartbeat); sessions and leases of an
  instance missing from it are dead and released by the scripts that meet them;
- ``mpr:due:{n}``: 16 ZSETs connection -> earliest lease end, swept for redelivery;
- ``mpr:old:{n}``: 16 ZSETs "connection\\nid" -> receivedAt, for the persister;
- ``mpr:age:{n}``: the same for the message TTL, when one is set.

MongoDB holds the payload of messages older than THRESHOLD_TIMESTAMP; their metadata stays in
Redis, so the queue order, leases and counts never span two systems and a message is in exactly
one place from a reader's view.
"""

from __future__ import annotations

import os
import zlib
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import orjson
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mpr_server.model import AddResult, Delivery, NewMessage, QueuedMessage, SocketRef
from mpr_server.push.model import PushToken
from mpr_server.redis.client import RedisClient
from mpr_server.redis.errors import RedisError, RedisResponseError
from mpr_server.redis.script import Script
from mpr_server.stores import redis_scripts as lua
from mpr_server.stores.base import Lease, QueueFull, SocketRelease, StoreUnavailable, TakeQuery
from mpr_server.stores.mongo import ColdMessage, ColdStore

BUCKETS = 16
INDEX_BATCH_S = 0.05  # index entries are written at most this long after their script
SESSION_HELD = 2**62  # tracking "lease end" of a session: until it is removed or its socket goes
PRUNE_INTERVAL_MS = 60_000
IMPORT_INTERVAL_S = 600.0  # how often to look for documents of an original deployment
INSTANCES = "mpr:instances"
LocalNotify = Callable[[str, Sequence[bytes]], None]


def tag(connection_id: str) -> str:
    """The hash tag of a connection: itself unless braces (or our escape) would break tagging."""
    if "{" in connection_id or "}" in connection_id or connection_id.startswith("~"):
        return "~" + connection_id.encode().hex()
    return connection_id


def connection_keys(connection_id: str) -> list[str]:
    t = tag(connection_id)
    return [f"mpr:{{{t}}}:{part}" for part in "plhmbsnt"]


def _token_json(message: NewMessage) -> bytes:
    token = message.push_token
    if token is None:
        return b""
    return orjson.dumps({"type": token.type, "token": token.token, "id": message.id})


def bucket(connection_id: str) -> int:
    return zlib.crc32(connection_id.encode()) % BUCKETS


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class DistributedStore:
    """MessageStore on Redis + MongoDB; one instance of it per MPR process."""

    name = "redis"
    _log = Logger()

    def __init__(
        self,
        redis: RedisClient,
        cold: ColdStore,
        reactor: IReactorTime,
        instance_id: str,
        *,
        instance_ttl_ms: int = 10_000,
        lease_ms: int = 60_000,
        threshold_ms: int = 60_000,
        allow_evicting: bool = False,
        timeout_s: float = 1.5,
        message_ttl: bool = False,
    ) -> None:
        if "/" in instance_id:
            raise ValueError("an instance id must not contain '/'")
        self.redis = redis
        self.cold = cold
        self._reactor = reactor
        self.instance_id = instance_id
        self._ttl_ms = instance_ttl_ms
        self._lease_ms = lease_ms
        self._threshold_ms = threshold_ms
        self._allow_evicting = allow_evicting
        self._timeout = timeout_s
        self._message_ttl = message_ttl
        self._live: list[str] = [instance_id]
        self._live_json = orjson.dumps(self._live).decode()
        # Connections where a local socket holds a session (until removed) or leases (until they
        # end): where to look when the socket goes. Ended entries are pruned now and then.
        self._socket_connections: defaultdict[SocketRef, dict[str, int]] = defaultdict(dict)
        self._next_prune_ms = 0
        self.on_notification: LocalNotify | None = None
        # Index entries waiting for the next batched write: key -> ZADD args / connection -> end.
        self._zadd_queue: defaultdict[str, list[Any]] = defaultdict(list)
        self._due_queue: defaultdict[int, dict[str, int]] = defaultdict(dict)
        self._index_call: IDelayedCall | None = None
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = reactor
        self._subscription: Any = None

    # -- plumbing --------------------------------------------------------------------------------

    async def _run(self, script: Script, connection_id: str, args: Sequence[Any]) -> Any:
        try:
            return await self.redis.eval_script(
                script, connection_keys(connection_id), [str(a) if isinstance(a, int) else a for a in args]
            )
        except RedisError as e:
            raise StoreUnavailable(f"Redis: {e}") from e

    async def _exec(self, args: Sequence[Any], key: str) -> Any:
        try:
            return await self.redis.execute(args, key=key)
        except RedisError as e:
            raise StoreUnavailable(f"Redis: {e}") from e

    def _liveness(self, now_ms: int) -> tuple[str, int]:
        return self._live_json, now_ms - 2 * self._ttl_ms

    def _messages(self, flat: Sequence[Any], start: int = 0) -> list[tuple[str, int, bytes | None]]:
        return [
            (_text(flat[i]), int(flat[i + 1]), None if flat[i + 2] is None else _bytes(flat[i + 2]))
            for i in range(start, len(flat), 3)
        ]

    async def _complete(self, raw: list[tuple[str, int, bytes | None]]) -> list[QueuedMessage]:
        """Fill in payloads that live in MongoDB."""
        missing = [message_id for message_id, _, body in raw if body is None]
        cold = await self.cold.payloads(missing) if missing else {}
        out = []
        for message_id, received_at, body in raw:
            payload = body if body is not None else cold.get(message_id)
            if payload is None:
                self._log.error("message {message_id} has no payload in Redis or MongoDB", message_id=message_id)
                continue
            out.append(QueuedMessage(message_id, received_at, payload))
        return out

    def _track(self, holder: SocketRef | None, connection_id: str, until_ms: int) -> None:
        if holder is not None and holder.instance == self.instance_id:
            held = self._socket_connections[holder]
            if held.get(connection_id, 0) < until_ms:
                held[connection_id] = until_ms

    def _prune_tracking(self, now_ms: int) -> None:
        if now_ms < self._next_prune_ms:
            return
        self._next_prune_ms = now_ms + PRUNE_INTERVAL_MS
        for holder, held in list(self._socket_connections.items()):
            for connection_id, until_ms in list(held.items()):
                if until_ms < now_ms:
                    del held[connection_id]
            if not held:
                del self._socket_connections[holder]

    def _index_lease(self, connection_id: str, until_ms: int, now_ms: int) -> None:
        """Record a lease end for the sweeper (batched)."""
        due = self._due_queue[bucket(connection_id)]
        due[connection_id] = min(due.get(connection_id, until_ms), until_ms)
        self._schedule_index_write()

    def _index_old(self, message: NewMessage) -> None:
        """Record a message for the persister and the TTL (batched)."""
        entry = f"{message.connection_id}\n{message.id}"
        n = bucket(message.connection_id)
        self._zadd_queue[f"mpr:old:{{{n}}}"].extend([message.received_at_ms, entry])
        if self._message_ttl:
            self._zadd_queue[f"mpr:age:{{{n}}}"].extend([message.received_at_ms, entry])
        self._schedule_index_write()

    def _schedule_index_write(self) -> None:
        if self._index_call is None:
            self._index_call = self._reactor.callLater(INDEX_BATCH_S, self._write_indexes_later)

    def _write_indexes_later(self) -> None:
        self._index_call = None
        d = Deferred.fromCoroutine(self.write_indexes())
        d.addErrback(lambda f: self._log.warn("index write failed, retrying: {e}", e=f.getErrorMessage()))

    async def write_indexes(self) -> None:
        """Write the batched index entries: one command per bucket. On failure they are queued again."""
        zadds, self._zadd_queue = self._zadd_queue, defaultdict(list)
        due, self._due_queue = self._due_queue, defaultdict(dict)
        now = int(self._reactor.seconds() * 1000)
        writes: list[Deferred[Any]] = []
        for key, args in zadds.items():
            writes.append(Deferred.fromCoroutine(self.redis.execute(["ZADD", key, *args], key=key)))
        for n, ends in due.items():
            pairs = [x for item in ends.items() for x in item]
            key = f"mpr:due:{{{n}}}"
            writes.append(Deferred.fromCoroutine(self.redis.eval_script(lua.INDEX_LEASES, [key], [now, *pairs])))
        results = await DeferredList(writes, consumeErrors=True)
        if all(ok for ok, _ in results):
            return
        for key, args in zadds.items():
            self._zadd_queue[key].extend(args)
        for ends in due.values():
            for connection_id, end in ends.items():
                self._index_lease(connection_id, end, now)
        self._schedule_index_write()
        raise StoreUnavailable("Redis index write failed")

    async def _delivery(self, flat: Sequence[Any], connection_id: str, until_ms: int) -> Delivery | None:
        """[inst, sock, id, receivedAt, body, ...] leased until ``until_ms`` -> Delivery."""
        if not flat:
            return None
        target = SocketRef(_text(flat[0]), _text(flat[1]))
        messages = await self._complete(self._messages(flat, 2))
        self._track(target, connection_id, until_ms)
        return Delivery(target, connection_id, messages) if messages else None

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self.redis.wait_ready(timeout=10)
        except RedisError as e:
            raise StoreUnavailable(f"Redis is not reachable: {e}") from e
        try:
            policies = await self.redis.get_config("maxmemory-policy")
        except RedisResponseError as e:
            # Managed services often disable CONFIG; we cannot check, so say what must hold.
            self._log.warn(
                "cannot read Redis maxmemory-policy ({error}); make sure it is noeviction, or queued messages"
                " may be evicted",
                error=str(e),
            )
            policies = {}
        except RedisError as e:
            raise StoreUnavailable(f"Redis is not reachable: {e}") from e
        evicting = {node: p for node, p in policies.items() if p and p != "noeviction"}
        if evicting and not self._allow_evicting:
            raise StoreUnavailable(
                f"Redis maxmemory-policy is {sorted(set(evicting.values()))} on {sorted(evicting)}: Redis may"
                " evict queued messages to free memory. Set maxmemory-policy noeviction (and appendonly yes), or"
                " ALLOW_EVICTING_REDIS=true to accept losing messages."
            )
        await self.cold.start()
        await self._beat()
        self._heartbeat.start(self._ttl_ms / 3000, now=False)
        channel = f"mpr:notify:{{{self.instance_id}}}"
        try:
            self._subscription = await self.redis.subscribe(channel, self._notified, sharded=True)
        except RedisError as e:
            raise StoreUnavailable(f"Redis subscribe failed: {e}") from e

    async def stop(self) -> None:
        if self._heartbeat.running:
            self._heartbeat.stop()
        if self._index_call is not None and self._index_call.active():
            self._index_call.cancel()
        self._index_call = None
        try:
            await self.write_indexes()
        except StoreUnavailable as e:
            self._log.warn("index entries not written at stop: {error}", error=str(e))
        try:
            await self.redis.execute(["ZREM", INSTANCES, self.instance_id], key=INSTANCES)
        except RedisError:
            pass
        await self.redis.close()
        await self.cold.stop()

    async def _beat(self) -> None:
        """Refresh our liveness deadline and read who else is alive."""
        now = int(self._reactor.seconds() * 1000)
        try:
            await self.redis.execute(["ZADD", INSTANCES, now + self._ttl_ms, self.instance_id], key=INSTANCES)
            live = await self.redis.execute(["ZRANGEBYSCORE", INSTANCES, now, "+inf"], key=INSTANCES)
            await self.redis.execute(["ZREMRANGEBYSCORE", INSTANCES, "-inf", now - 3_600_000], key=INSTANCES)
        except RedisError as e:
            self._log.warn("liveness heartbeat failed: {error}", error=str(e))
            return
        names = sorted({_text(name) for name in live} | {self.instance_id})
        self._live = names
        self._live_json = orjson.dumps(names).decode()

    async def ping(self) -> None:
        await self._exec(["PING"], INSTANCES)
        await self.cold.ping()

    # -- notifications between instances -----------------------------------------------------------

    def publish(self, delivery: Delivery, frames: Sequence[bytes]) -> None:
        header = orjson.dumps([delivery.target.socket, delivery.connection_id])
        message = b"\n".join([header, *frames])
        channel = f"mpr:notify:{{{delivery.target.instance}}}"
        d = Deferred.fromCoroutine(self.redis.publish(channel, message, sharded=True))
        d.addErrback(lambda f: self._log.warn("notification publish failed: {e}", e=f.getErrorMessage()))

    def _notified(self, channel: str, message: Any) -> None:
        try:
            header, *frames = _bytes(message).split(b"\n")
            socket_id, connection_id = orjson.loads(header)
        except (ValueError, TypeError):
            self._log.warn("ignoring a malformed notification on {channel}", channel=channel)
            return
        until_ms = int(self._reactor.seconds() * 1000) + self._lease_ms
        self._track(SocketRef(self.instance_id, socket_id), connection_id, until_ms)
        if self.on_notification is not None:
            self.on_notification(socket_id, frames)

    # -- MessageStore --------------------------------------------------------------------------------

    async def add(self, message: NewMessage, lease: Lease, max_queued: int = 0) -> AddResult:
        live, cutoff = self._liveness(lease.now_ms)
        reply = await self._run(
            lua.ADD,
            message.connection_id,
            [
                message.id,
                message.received_at_ms,
                message.size,
                orjson.dumps(message.recipient_dids),
                message.payload,
                lease.until_ms,
                live,
                cutoff,
                max_queued,
                _token_json(message),
            ],
        )
        kind = _text(reply[0])
        if kind == "full":
            raise QueueFull(f"the queue of connection {message.connection_id} is full ({max_queued} messages)")
        self._index_old(message)
        if kind == "d":
            target = SocketRef(_text(reply[1]), _text(reply[2]))
            self._track(target, message.connection_id, lease.until_ms)
            self._index_lease(message.connection_id, lease.until_ms, lease.now_ms)
            queued = QueuedMessage(message.id, message.received_at_ms, message.payload)
            return AddResult(delivery=Delivery(target, message.connection_id, (queued,)))
        if kind == "h":
            return AddResult(held_by=SocketRef(_text(reply[1]), _text(reply[2])))
        return AddResult()

    async def take(self, query: TakeQuery, holder: SocketRef | None, lease: Lease) -> list[QueuedMessage]:
        live, cutoff = self._liveness(lease.now_ms)
        lease_holder = holder.key() if holder is not None and not query.delete else ""
        reply = await self._run(
            lua.TAKE,
            query.connection_id,
            [
                query.recipient_did or "",
                query.limit,
                query.limit_bytes,
                "1" if query.delete else "0",
                lease_holder,
                lease.now_ms,
                lease.until_ms,
                live,
                cutoff,
                self._lease_ms,
            ],
        )
        offloaded = orjson.loads(_bytes(reply[0])) or []
        messages = await self._complete(self._messages(reply, 1))
        if offloaded:
            await self.cold.delete(offloaded)
        if lease_holder and messages:
            self._track(holder, query.connection_id, lease.until_ms)
            self._index_lease(query.connection_id, lease.until_ms, lease.now_ms)
        return messages

    async def count(self, connection_id: str, recipient_did: str | None, now_ms: int) -> int:
        live, cutoff = self._liveness(now_ms)
        reply = await self._run(lua.COUNT, connection_id, [recipient_did or "", now_ms, live, cutoff, self._lease_ms])
        return int(reply)

    async def remove(self, connection_id: str, message_ids: Sequence[str]) -> None:
        await self._remove(connection_id, message_ids)

    async def _remove(self, connection_id: str, message_ids: Sequence[str]) -> int:
        removed = 0
        offloaded: list[str] = []
        for start in range(0, len(message_ids), 1000):
            reply = await self._run(lua.REMOVE, connection_id, list(message_ids[start : start + 1000]))
            removed += int(reply[0])
            offloaded.extend(orjson.loads(_bytes(reply[1])) or [])
        await self.cold.delete(offloaded)
        return removed

    async def remove_all(self, connection_id: str, recipient_did: str) -> None:
        reply = await self._run(lua.REMOVE_ALL, connection_id, [recipient_did])
        await self.cold.delete(orjson.loads(_bytes(reply)) or [])

    async def add_session(
        self, connection_id: str, session_id: str, holder: SocketRef, lease: Lease
    ) -> Delivery | None:
        reply = await self._run(
            lua.ADD_SESSION,
            connection_id,
            [session_id, holder.instance, holder.socket, lease.now_ms, lease.until_ms],
        )
        self._track(holder, connection_id, SESSION_HELD)
        if not reply:
            return None
        self._index_lease(connection_id, lease.until_ms, lease.now_ms)
        return await self._delivery([holder.instance, holder.socket, *reply], connection_id, lease.until_ms)

    async def remove_session(self, connection_id: str, holder: SocketRef, session_id: str | None) -> bool:
        reply = await self._run(lua.REMOVE_SESSION, connection_id, [holder.key(), session_id or ""])
        removed = bool(int(reply))
        if removed and session_id is None:
            # The caller held it; the script released every lease it had on the connection.
            self._socket_connections.get(holder, {}).pop(connection_id, None)
        return removed

    async def has_session(self, connection_id: str) -> bool:
        now = int(self._reactor.seconds() * 1000)
        live, cutoff = self._liveness(now)
        return bool(int(await self._run(lua.HAS_SESSION, connection_id, [live, cutoff])))

    async def release_expired(self, lease: Lease) -> list[Delivery]:
        """Sweep the lease-due buckets this instance can claim for this tick."""
        self._prune_tracking(lease.now_ms)
        await self.write_indexes()
        results = await DeferredList(
            [Deferred.fromCoroutine(self._sweep_bucket(n, lease)) for n in range(BUCKETS)], consumeErrors=True
        )
        deliveries: list[Delivery] = []
        for ok, value in results:
            if ok:
                deliveries.extend(value)
            else:
                self._log.warn("lease sweep failed: {e}", e=value.getErrorMessage())  # type: ignore[attr-defined]
        return deliveries

    @asynccontextmanager
    async def _claimed(self, name: str, ttl_ms: int) -> AsyncIterator[bool]:
        """Claim a piece of shared work for at most ``ttl_ms`` (so that instances share it without
        a leader); yields whether we got it, and gives it back when done."""
        lock = f"mpr:lock:{name}"
        token = f"{self.instance_id}/{os.urandom(6).hex()}"
        claimed = bool(await self._exec(["SET", lock, token, "NX", "PX", ttl_ms], lock))
        try:
            yield claimed
        finally:
            if claimed:
                try:
                    await self.redis.eval_script(lua.UNLOCK, [lock], [token])
                except RedisError:
                    pass  # it expires by itself

    async def _sweep_bucket(self, n: int, lease: Lease) -> list[Delivery]:
        async with self._claimed(f"due:{{{n}}}", 5_000) as claimed:
            return await self._sweep_claimed_bucket(n, lease) if claimed else []

    async def _sweep_claimed_bucket(self, n: int, lease: Lease) -> list[Delivery]:
        key = f"mpr:due:{{{n}}}"
        due = await self._exec(["ZRANGEBYSCORE", key, "-inf", lease.now_ms, "WITHSCORES", "LIMIT", 0, 200], key)
        deliveries = []
        live, cutoff = self._liveness(lease.now_ms)
        for i in range(0, len(due), 2):
            connection_id, seen = _text(due[i]), _text(due[i + 1])
            reply = await self._run(
                lua.RELEASE_EXPIRED, connection_id, [lease.now_ms, lease.until_ms, live, cutoff, self._lease_ms]
            )
            next_end = "" if reply[0] is None else str(int(reply[0]))
            await self.redis.eval_script(lua.INDEX_SWEPT, [key], [connection_id, seen, next_end])
            delivery = await self._delivery(reply[1:], connection_id, lease.until_ms)
            if delivery is not None:
                deliveries.append(delivery)
        return deliveries

    async def release_socket(self, holder: SocketRef, keep_sessions: bool, lease: Lease) -> SocketRelease:
        connections = sorted(self._socket_connections.get(holder, ()))
        if not keep_sessions:
            self._socket_connections.pop(holder, None)
        live, cutoff = self._liveness(lease.now_ms)
        dropped, deliveries, pushes = [], [], []
        for connection_id in connections:
            reply = await self._run(
                lua.RELEASE_HOLDER,
                connection_id,
                [holder.key(), "1" if keep_sessions else "0", lease.until_ms, live, cutoff],
            )
            if int(reply[0]):
                dropped.append(connection_id)
            if reply[1] is not None:
                held = orjson.loads(_bytes(reply[1]))
                pushes.append((PushToken(held["type"], held["token"]), held["id"]))
            delivery = await self._delivery(reply[3:], connection_id, lease.until_ms)
            if delivery is not None:
                deliveries.append(delivery)
                self._index_lease(connection_id, lease.until_ms, lease.now_ms)
        return SocketRelease(dropped, deliveries, pushes)

    async def attach_socket(self, holder: SocketRef, lease: Lease) -> list[Delivery]:
        deliveries = []
        for connection_id in sorted(self._socket_connections.get(holder, ())):
            reply = await self._run(lua.ATTACH, connection_id, [holder.key(), lease.until_ms])
            if reply:
                self._index_lease(connection_id, lease.until_ms, lease.now_ms)
                delivery = await self._delivery([holder.instance, holder.socket, *reply], connection_id, lease.until_ms)
                if delivery is not None:
                    deliveries.append(delivery)
        return deliveries

    # -- persister -------------------------------------------------------------------------------

    async def persist_once(self, now_ms: int, batch: int = 200) -> int:
        """Move payloads older than the threshold to MongoDB; returns how many moved. Idempotent and
        safe to interrupt anywhere: Mongo upsert first, then the Redis body is dropped only if the
        message is still there, then the index entry goes."""
        await self.write_indexes()
        moved = 0
        for n in range(BUCKETS):
            async with self._claimed(f"old:{{{n}}}", 30_000) as claimed:
                if claimed:
                    moved += await self._persist_bucket(f"mpr:old:{{{n}}}", now_ms - self._threshold_ms, batch)
        return moved

    async def _persist_bucket(self, key: str, older_than_ms: int, batch: int) -> int:
        entries = await self._exec(["ZRANGEBYSCORE", key, "-inf", older_than_ms, "LIMIT", 0, batch], key)
        if not entries:
            return 0
        found: list[tuple[str, ColdMessage]] = []
        gone: list[str] = []
        for entry in map(_text, entries):
            connection_id, _, message_id = entry.rpartition("\n")
            reply = await self._run(lua.OFFLOAD_READ, connection_id, [message_id])
            if not reply:
                gone.append(entry)
                continue
            _seq, received_at, _size, dids = orjson.loads(_bytes(reply[0]))
            payload = _bytes(reply[1])
            found.append((entry, ColdMessage(message_id, connection_id, dids, payload, int(received_at))))
        await self.cold.save([m for _, m in found])
        await self.before_offload_done()
        removed_meanwhile = []
        for entry, m in found:
            if not int(await self._run(lua.OFFLOAD_DONE, m.connection_id, [m.message_id])):
                removed_meanwhile.append(m.message_id)
            gone.append(entry)
        await self.cold.delete(removed_meanwhile)
        await self._exec(["ZREM", key, *gone], key)
        return len(found)

    async def expire(self, received_before_ms: int) -> int:
        """Delete messages older than the TTL, a bounded batch per bucket per call."""
        if not self._message_ttl:
            return 0
        await self.write_indexes()
        expired = 0
        for n in range(BUCKETS):
            async with self._claimed(f"age:{{{n}}}", 5_000) as claimed:
                if claimed:
                    expired += await self._expire_bucket(f"mpr:age:{{{n}}}", received_before_ms)
        return expired

    async def _expire_bucket(self, key: str, received_before_ms: int) -> int:
        entries = await self._exec(["ZRANGEBYSCORE", key, "-inf", received_before_ms - 1, "LIMIT", 0, 1000], key)
        if not entries:
            return 0
        by_connection: defaultdict[str, list[str]] = defaultdict(list)
        for entry in map(_text, entries):
            connection_id, _, message_id = entry.rpartition("\n")
            by_connection[connection_id].append(message_id)
        expired = 0
        for connection_id, message_ids in by_connection.items():
            expired += await self._remove(connection_id, message_ids)
        await self._exec(["ZREM", key, *entries], key)
        return expired

    async def import_originals_once(self, batch: int = 500) -> int:
        """Queue again the messages an original MPR deployment left in MongoDB (documents we did
        not write), resuming after the last one imported; returns how many were seen. Safe to
        repeat and to run on every instance (claimed, idempotent per message)."""
        async with self._claimed("import", 120_000) as claimed:
            if not claimed:
                return 0
            cursor_key = "mpr:import:last"
            after = await self._exec(["GET", cursor_key], cursor_key)
            documents = await self.cold.originals(_text(after) if after else None, batch)
            imported = 0
            for _, message in documents:
                if message is None:
                    continue
                dids = orjson.dumps(list(message.recipient_dids))
                reply = await self._run(
                    lua.IMPORT,
                    message.connection_id,
                    [message.message_id, message.received_at_ms, len(message.payload), dids],
                )
                imported += int(reply)
            if documents:
                await self._exec(["SET", cursor_key, documents[-1][0]], cursor_key)
            if imported:
                self._log.info("queued {n} messages left in MongoDB by an earlier deployment", n=imported)
            return len(documents)

    async def before_offload_done(self) -> None:
        """A seam for fault-injection tests: runs between the MongoDB write and the Redis removal."""


class RedisThrottle:
    """At most one push per key per window across every instance: ``SET NX PX``."""

    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis

    async def acquire(self, key: str, window_ms: int) -> bool:
        if window_ms <= 0:
            return True
        name = f"mpr:push:{key}"
        return bool(await self._redis.execute(["SET", name, "1", "NX", "PX", window_ms], key=name))


class Persister(LoopingCall):
    """Moves old payloads to MongoDB on a timer in every instance (work is claimed per bucket, so
    instances share it without a leader). A failing tick logs; the next one retries."""

    _log = Logger()

    def __init__(self, store: DistributedStore, clock: IReactorTime, interval_s: float) -> None:
        super().__init__(self._tick)
        self.clock = clock
        self._store = store
        self.interval_s = interval_s
        self._next_import = 0.0

    def _tick(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._run_once())

    async def _run_once(self) -> None:
        now = self.clock.seconds()
        try:
            moved = await self._store.persist_once(int(now * 1000))
            if now >= self._next_import:
                # Documents of an original deployment: all of them at start-up, then new ones.
                seen = await self._store.import_originals_once()
                self._next_import = now if seen else now + IMPORT_INTERVAL_S
        except Exception as e:
            self._log.warn("persister tick failed, the next tick retries: {error}", error=f"{type(e).__name__}: {e}")
            return
        if moved:
            self._log.debug("persisted {moved} messages to MongoDB", moved=moved)
