"""``RedisStore``: the MessageStore on Redis + MongoDB, one per MPR process, shared by any number
of them.

Every change to a connection is one Lua script on its hash-tagged keys (``scripts.py``, replies
decoded by ``replies.py``). Around them: the liveness of instances (``liveness.py``), batched
shared indexes (``indexes.py``), which local sockets hold what (``holders.py``), claims on shared
work (``claims.py``), the cold tier in MongoDB (``tiering.py``) and the import of an original
deployment's messages (``upgrade.py``). Notifications between instances are ``fanout.py``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mpr_server._async import gather
from mpr_server.errors import QueueFull, StoreUnavailable
from mpr_server.model import (
    AddResult,
    Delivery,
    Lease,
    NewMessage,
    QueuedMessage,
    SocketRef,
    SocketRelease,
    TakeQuery,
)
from mpr_server.redis import RedisClient, RedisError, RedisResponseError, Script
from mpr_server.stores.mongo.cold import ColdStore
from mpr_server.stores.redis import replies
from mpr_server.stores.redis import scripts as lua
from mpr_server.stores.redis.calls import execute, run_script
from mpr_server.stores.redis.claims import Claims
from mpr_server.stores.redis.holders import LocalHolders
from mpr_server.stores.redis.indexes import IndexWriter
from mpr_server.stores.redis.keys import BUCKETS, INSTANCES, age_key, due_key, split_entry
from mpr_server.stores.redis.liveness import Liveness
from mpr_server.stores.redis.replies import RawMessage, Redelivery, as_text
from mpr_server.stores.redis.tiering import Tiering
from mpr_server.stores.redis.upgrade import OriginalImport

SWEEP_BATCH = 200
EXPIRE_BATCH = 1000
REMOVE_BATCH = 1000
AUDIT_BATCH = 1000  # connections with a local live session swept directly, per lease period


def _token_json(message: NewMessage) -> bytes:
    token = message.push_token
    if token is None:
        return b""
    return orjson.dumps({"type": token.type, "token": token.token, "id": message.id})


class RedisStore:
    """See the module docstring."""

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
        message_ttl: bool = False,
        wait_replicas: int = 0,
    ) -> None:
        if "/" in instance_id:
            raise ValueError("an instance id must not contain '/'")
        self.redis = redis
        self.cold = cold
        self._reactor = reactor
        self.instance_id = instance_id
        self._lease_ms = lease_ms
        self._allow_evicting = allow_evicting
        self._message_ttl = message_ttl
        # replicas that must have a change before a mediator is told it succeeded
        self.wait_replicas = wait_replicas
        self.liveness = Liveness(redis, reactor, instance_id, instance_ttl_ms)
        self.holders = LocalHolders(instance_id)
        self.indexes = IndexWriter(redis, reactor, message_ttl)
        self.claims = Claims(redis, instance_id)
        self.tiering = Tiering(redis, cold, self.indexes, self.claims, threshold_ms)
        self._next_audit_ms = 0
        self._audit_cursor = 0
        self.originals = OriginalImport(redis, cold, self.indexes, reactor, instance_id, instance_ttl_ms)
        self.import_original = True  # at start, before serving (see upgrade.py)

    # -- plumbing --------------------------------------------------------------------------------

    async def _run(self, script: Script, connection_id: str, args: Sequence[Any], *, acked: bool = False) -> Any:
        """Run a script; ``acked``: the mediator is told the change succeeded, so it waits for
        REDIS_WAIT_REPLICAS replicas to have it."""
        return await run_script(self.redis, script, connection_id, args, replicas=self.wait_replicas if acked else 0)

    async def _exec(self, args: Sequence[Any], key: str) -> Any:
        return await execute(self.redis, args, key)

    async def _complete(self, raw: list[RawMessage], known: dict[str, bytes] | None = None) -> list[QueuedMessage]:
        """Fill in payloads that live in MongoDB (``known``: some of them, read already)."""
        cold = dict(known or {})
        missing = [message_id for message_id, _, body in raw if body is None and message_id not in cold]
        if missing:
            cold.update(await self.cold.payloads(missing))
        out = []
        for message_id, received_at, body in raw:
            payload = body if body is not None else cold.get(message_id)
            if payload is None:
                self._log.error("message {message_id} has no payload in Redis or MongoDB", message_id=message_id)
                continue
            out.append(QueuedMessage(message_id, received_at, payload))
        return out

    async def _delivery(self, redelivery: Redelivery, connection_id: str, until_ms: int) -> Delivery | None:
        """Messages leased until ``until_ms`` to ``redelivery.target`` -> Delivery."""
        if redelivery.target is None:
            return None
        messages = await self._complete(redelivery.messages)
        self.holders.track(redelivery.target, connection_id, until_ms)
        return Delivery(redelivery.target, connection_id, messages) if messages else None

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
        await self.liveness.start()
        if self.import_original:
            await self.originals.run()

    async def stop(self) -> None:
        try:
            await self.indexes.write()
        except StoreUnavailable as e:
            self._log.warn("index entries not written at stop: {error}", error=str(e))
        await self.liveness.stop()
        await self.redis.close()
        await self.cold.stop()

    async def ping(self) -> None:
        await self._exec(["PING"], INSTANCES)
        await self.cold.ping()

    # -- MessageStore --------------------------------------------------------------------------------

    async def add(self, message: NewMessage, lease: Lease, max_queued: int = 0) -> AddResult:
        live, cutoff = self.liveness.live(lease.now_ms)
        reply = replies.add(
            await self._run(
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
                acked=True,
            )
        )
        if reply.kind == "full":
            raise QueueFull(f"the queue of connection {message.connection_id} is full ({max_queued} messages)")
        self.indexes.message_added(message)
        if reply.kind == "d":
            assert reply.holder is not None
            self.holders.track(reply.holder, message.connection_id, lease.until_ms)
            self.indexes.lease_ends(message.connection_id, lease.until_ms)
            queued = QueuedMessage(message.id, message.received_at_ms, message.payload)
            return AddResult(delivery=Delivery(reply.holder, message.connection_id, (queued,)))
        if reply.kind == "h":
            return AddResult(held_by=reply.holder)
        return AddResult()

    async def take(self, query: TakeQuery, holder: SocketRef | None, lease: Lease) -> list[QueuedMessage]:
        """A take that deletes (Pickup v1) leases first and deletes what it returns once its
        payloads are read: if Redis or MongoDB fails in between (or the script's reply is lost),
        the messages stay leased and come back when the lease ends, instead of being deleted
        unseen. Once they are handed over, only the mediator's side can lose them."""
        live, cutoff = self.liveness.live(lease.now_ms)
        if holder is not None:
            lease_to = holder.key()
        elif query.delete:
            lease_to = f"{self.instance_id}/~take"
        else:
            lease_to = ""
        reply = replies.take(
            await self._run(
                lua.TAKE,
                query.connection_id,
                [
                    query.recipient_did or "",
                    query.limit,
                    query.limit_bytes,
                    "0",
                    lease_to,
                    lease.now_ms,
                    lease.until_ms,
                    live,
                    cutoff,
                    self._lease_ms,
                ],
                acked=bool(lease_to),
            )
        )
        messages = await self._complete(reply.messages)
        if query.delete and reply.messages:
            try:
                await self._remove(query.connection_id, [message_id for message_id, _, _ in reply.messages])
                return messages
            except StoreUnavailable as e:
                # handed over all the same: they stay leased, and come again once the lease ends
                self._log.warn(
                    "taken with deleteMessages, but not deleted ({error}): they come again after their lease",
                    error=str(e),
                )
        if lease_to and messages:
            self.holders.track(holder, query.connection_id, lease.until_ms)
            self.indexes.lease_ends(query.connection_id, lease.until_ms)
        return messages

    async def count(self, connection_id: str, recipient_did: str | None, now_ms: int) -> int:
        live, cutoff = self.liveness.live(now_ms)
        return replies.count(
            await self._run(lua.COUNT, connection_id, [recipient_did or "", now_ms, live, cutoff, self._lease_ms])
        )

    async def remove(self, connection_id: str, message_ids: Sequence[str]) -> None:
        await self._remove(connection_id, message_ids)

    async def _remove(self, connection_id: str, message_ids: Sequence[str]) -> int:
        removed = 0
        offloaded: list[str] = []
        for start in range(0, len(message_ids), REMOVE_BATCH):
            batch = list(message_ids[start : start + REMOVE_BATCH])
            reply = replies.remove(await self._run(lua.REMOVE, connection_id, batch, acked=True))
            removed += reply.removed
            offloaded.extend(reply.offloaded)
        await self.cold.delete(offloaded)
        return removed

    async def remove_all(self, connection_id: str, recipient_did: str) -> None:
        await self.cold.delete(
            replies.remove_all(await self._run(lua.REMOVE_ALL, connection_id, [recipient_did], acked=True))
        )

    async def add_session(
        self, connection_id: str, session_id: str, holder: SocketRef, lease: Lease
    ) -> Delivery | None:
        reply = replies.leased_messages(
            await self._run(
                lua.ADD_SESSION,
                connection_id,
                [session_id, holder.instance, holder.socket, lease.now_ms, lease.until_ms],
                acked=True,
            )
        )
        self.holders.track_session(holder, connection_id)
        if not reply:
            return None
        self.indexes.lease_ends(connection_id, lease.until_ms)
        return await self._delivery(Redelivery(holder, reply), connection_id, lease.until_ms)

    async def remove_session(self, connection_id: str, holder: SocketRef, session_id: str | None) -> bool:
        removed = replies.flag(
            await self._run(lua.REMOVE_SESSION, connection_id, [holder.key(), session_id or ""], acked=True)
        )
        if removed and session_id is None:
            # The caller held it; the script released every lease it had on the connection.
            self.holders.forget(holder, connection_id)
        return removed

    async def has_session(self, connection_id: str) -> bool:
        live, cutoff = self.liveness.live(int(self._reactor.seconds() * 1000))
        return replies.flag(await self._run(lua.HAS_SESSION, connection_id, [live, cutoff]))

    async def release_expired(self, lease: Lease) -> list[Delivery]:
        """Sweep the lease-due buckets this instance can claim for this tick (and, once a lease
        period, the connections whose live sessions are held here: see ``_audit_sessions``)."""
        self.holders.prune(lease.now_ms)
        await self.indexes.write()
        deliveries: list[Delivery] = []
        for result in await gather([self._sweep_bucket(n, lease) for n in range(BUCKETS)]):
            if isinstance(result, Failure):
                self._log.warn("lease sweep failed: {e}", e=result.getErrorMessage())
            else:
                deliveries.extend(result)
        if lease.now_ms >= self._next_audit_ms:
            self._next_audit_ms = lease.now_ms + self._lease_ms
            deliveries.extend(await self._audit_sessions(lease))
        return deliveries

    async def _audit_sessions(self, lease: Lease) -> list[Delivery]:
        """The sweep reads lease ends from an index written shortly after the scripts that made
        the leases; an instance killed in between, or an add whose reply was lost, leaves a lease
        the sweep never sees. Once a lease period, the connections whose live session a local
        socket holds are swept directly (bounded per round), so such a lease ends in time too."""
        held = self.holders.session_connections()
        if not held:
            return []
        start = self._audit_cursor % len(held)
        batch = (held[start:] + held[:start])[:AUDIT_BATCH]
        self._audit_cursor = start + len(batch)
        live, cutoff = self.liveness.live(lease.now_ms)
        deliveries = []
        for _, connection_id in batch:
            reply = replies.release_expired(
                await self._run(
                    lua.RELEASE_EXPIRED, connection_id, [lease.now_ms, lease.until_ms, live, cutoff, self._lease_ms]
                )
            )
            if reply.next_lease_end is not None:
                self.indexes.lease_ends(connection_id, reply.next_lease_end)
            delivery = await self._delivery(reply.redelivery, connection_id, lease.until_ms)
            if delivery is not None:
                deliveries.append(delivery)
        return deliveries

    async def _sweep_bucket(self, n: int, lease: Lease) -> list[Delivery]:
        async with self.claims.claimed(f"due:{{{n}}}", 5_000) as claimed:
            return await self._sweep_claimed_bucket(n, lease) if claimed else []

    async def _sweep_claimed_bucket(self, n: int, lease: Lease) -> list[Delivery]:
        key = due_key(n)
        due = await self._exec(["ZRANGEBYSCORE", key, "-inf", lease.now_ms, "WITHSCORES", "LIMIT", 0, SWEEP_BATCH], key)
        deliveries = []
        live, cutoff = self.liveness.live(lease.now_ms)
        for i in range(0, len(due), 2):
            connection_id, seen = as_text(due[i]), as_text(due[i + 1])
            reply = replies.release_expired(
                await self._run(
                    lua.RELEASE_EXPIRED, connection_id, [lease.now_ms, lease.until_ms, live, cutoff, self._lease_ms]
                )
            )
            next_end = "" if reply.next_lease_end is None else str(reply.next_lease_end)
            await self.redis.eval_script(lua.INDEX_SWEPT, [key], [connection_id, seen, next_end])
            delivery = await self._delivery(reply.redelivery, connection_id, lease.until_ms)
            if delivery is not None:
                deliveries.append(delivery)
        return deliveries

    async def release_socket(self, holder: SocketRef, keep_sessions: bool, lease: Lease) -> SocketRelease:
        connections = self.holders.connections(holder)
        if not keep_sessions:
            self.holders.forget(holder)
        live, cutoff = self.liveness.live(lease.now_ms)
        dropped, deliveries, pushes = [], [], []
        for connection_id in connections:
            reply = replies.release_holder(
                await self._run(
                    lua.RELEASE_HOLDER,
                    connection_id,
                    [holder.key(), "1" if keep_sessions else "0", lease.until_ms, live, cutoff],
                )
            )
            if reply.dropped:
                dropped.append(connection_id)
            if reply.held_push is not None:
                pushes.append(reply.held_push)
            delivery = await self._delivery(reply.redelivery, connection_id, lease.until_ms)
            if delivery is not None:
                deliveries.append(delivery)
                self.indexes.lease_ends(connection_id, lease.until_ms)
        return SocketRelease(dropped, deliveries, pushes)

    async def attach_socket(self, holder: SocketRef, lease: Lease) -> list[Delivery]:
        deliveries = []
        for connection_id in self.holders.connections(holder):
            reply = replies.leased_messages(await self._run(lua.ATTACH, connection_id, [holder.key(), lease.until_ms]))
            if reply:
                self.indexes.lease_ends(connection_id, lease.until_ms)
                delivery = await self._delivery(Redelivery(holder, reply), connection_id, lease.until_ms)
                if delivery is not None:
                    deliveries.append(delivery)
        return deliveries

    async def expire(self, received_before_ms: int) -> int:
        """Delete messages older than the TTL, a bounded batch per bucket per call."""
        if not self._message_ttl:
            return 0
        await self.indexes.write()
        expired = 0
        for n in range(BUCKETS):
            async with self.claims.claimed(f"age:{{{n}}}", 5_000) as claimed:
                if claimed:
                    expired += await self._expire_bucket(age_key(n), received_before_ms)
        return expired

    async def _expire_bucket(self, key: str, received_before_ms: int) -> int:
        entries = await self._exec(
            ["ZRANGEBYSCORE", key, "-inf", received_before_ms - 1, "LIMIT", 0, EXPIRE_BATCH], key
        )
        if not entries:
            return 0
        by_connection: dict[str, list[str]] = {}
        for entry in map(as_text, entries):
            connection_id, message_id = split_entry(entry)
            by_connection.setdefault(connection_id, []).append(message_id)
        expired = 0
        for connection_id, message_ids in by_connection.items():
            expired += await self._remove(connection_id, message_ids)
        await self._exec(["ZREM", key, *entries], key)
        return expired
