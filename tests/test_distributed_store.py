"""The store contract against the distributed store: Redis (single and a 3-master cluster) with
MongoDB, all real servers started by tests/services.py. Plus the tiering (persister) behaviour."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.logger import capturedLogs, formatEvent

from mpr_server.errors import StoreUnavailable
from mpr_server.model import TakeQuery
from mpr_server.redis import SingleRedisClient
from mpr_server.redis.cluster import ClusterRedisClient
from mpr_server.redis.url import Address
from mpr_server.stores.mongo.cold import ColdStore
from mpr_server.stores.redis.store import RedisStore
from scripts.services.redis import start_redis
from tests.services import Mongo, RedisCluster, RedisSingle, start_or_skip
from tests.store_contract import LEASE_MS, T0, A, StoreContract, add, add_many, cid, ids, lease

INSTANCE = A.instance  # the contract's sockets live on this instance


def make_store(
    reactor: Any, redis: Any, mongo: Mongo, threshold_ms: int = 60_000, allow_evicting: bool = False
) -> RedisStore:
    cold = ColdStore(f"{mongo.uri}/mpr_test_{uuid.uuid4().hex[:8]}", reactor)
    return RedisStore(
        redis,
        cold,
        reactor,
        INSTANCE,
        lease_ms=LEASE_MS,
        threshold_ms=threshold_ms,
        allow_evicting=allow_evicting,
        message_ttl=True,
    )


class TestSingleRedisContract(StoreContract):
    @pytest_twisted.async_yield_fixture
    async def store(self, reactor: Any, redis_single: RedisSingle, mongod: Mongo) -> AsyncIterator[RedisStore]:
        store = make_store(reactor, SingleRedisClient(reactor, redis_single.url, timeout=2), mongod)
        await store.start()
        yield store
        await store.stop()


class TestClusterRedisContract(StoreContract):
    @pytest_twisted.async_yield_fixture
    async def store(self, reactor: Any, redis_cluster: RedisCluster, mongod: Mongo) -> AsyncIterator[RedisStore]:
        store = make_store(
            reactor, ClusterRedisClient(reactor, [Address(*n) for n in redis_cluster.nodes], timeout=2), mongod
        )
        await store.start()
        yield store
        await store.stop()


@pytest_twisted.async_yield_fixture
async def tiered(reactor: Any, redis_single: RedisSingle, mongod: Mongo) -> AsyncIterator[RedisStore]:
    store = make_store(reactor, SingleRedisClient(reactor, redis_single.url, timeout=2), mongod, threshold_ms=1000)
    await store.start()
    yield store
    await store.stop()


async def persist_all(store: RedisStore, now_ms: int) -> int:
    moved = 0
    while True:
        n = await store.tiering.persist_once(now_ms)
        if not n:
            return moved
        moved += n


@pytest_twisted.ensureDeferred
async def test_persisted_messages_read_like_hot_ones(tiered: RedisStore) -> None:
    c = cid()
    old = await add_many(tiered, c, 5)
    assert await persist_all(tiered, T0 + 10_000) >= 5
    new = await add(tiered, c, 99, now=T0 + 20_000)
    # Bodies of the old ones are only in MongoDB now.
    cold = await tiered.cold.payloads(ids(old))
    assert cold == {m.id: m.payload for m in old}
    assert await tiered.count(c, None, T0) == 6
    first = await tiered.take(TakeQuery(c, limit=3), A, lease())
    assert [(m.id, m.payload) for m in first] == [(m.id, m.payload) for m in old[:3]]
    await tiered.remove(c, ids(first))
    assert await tiered.cold.payloads(ids(first)) == {}
    rest = await tiered.take(TakeQuery(c), A, lease())
    assert ids(rest) == [*ids(old[3:]), new.id]
    later = T0 + LEASE_MS
    again = await tiered.take(TakeQuery(c, delete=True), None, lease(later))
    assert ids(again) == ids(rest)
    assert await tiered.count(c, None, later) == 0
    assert await tiered.cold.payloads(ids(old)) == {}


@pytest_twisted.ensureDeferred
async def test_persister_interrupted_between_mongo_and_redis_duplicates_nothing(tiered: RedisStore) -> None:
    c = cid()
    sent = await add_many(tiered, c, 4)

    async def crash() -> None:
        raise RuntimeError("crash between the MongoDB write and the Redis removal")

    tiered.tiering.before_offload_done = crash  # type: ignore[method-assign]
    try:
        await tiered.tiering.persist_once(T0 + 10_000)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the injected crash did not happen")
    # Written to MongoDB but still whole in Redis: readers see each message once.
    assert set(await tiered.cold.payloads(ids(sent))) == set(ids(sent))
    await tiered.remove(c, [sent[0].id])
    del tiered.tiering.before_offload_done
    await tiered._exec(["DEL", *[f"mpr:lock:old:{{{n}}}" for n in range(16)]], "mpr:lock:old:{0}")
    await persist_all(tiered, T0 + 10_000)
    taken = await tiered.take(TakeQuery(c), A, lease())
    assert [(m.id, m.payload) for m in taken] == [(m.id, m.payload) for m in sent[1:]]
    assert await tiered.cold.payloads([sent[0].id]) == {}


@pytest_twisted.ensureDeferred
async def test_redis_without_config_command_starts_with_a_warning(reactor: Any, mongod: Mongo) -> None:
    server = start_or_skip("redis-server", lambda: start_redis(extra_args=("--rename-command", "CONFIG", "")))
    store = make_store(reactor, SingleRedisClient(reactor, f"redis://127.0.0.1:{server.port}/0", timeout=2), mongod)
    try:
        with capturedLogs() as events:
            await store.start()
        assert any("maxmemory-policy" in formatEvent(e) for e in events)
        c = cid()
        await add(store, c, 1)
        assert await store.count(c, None, T0) == 1
    finally:
        await store.stop()
        server.stop()


@pytest_twisted.ensureDeferred
async def test_evicting_redis_is_refused_unless_allowed(reactor: Any, mongod: Mongo) -> None:
    server = start_or_skip("redis-server", lambda: start_redis(extra_args=("--maxmemory-policy", "allkeys-lru")))
    url = f"redis://127.0.0.1:{server.port}/0"
    try:
        refused = make_store(reactor, SingleRedisClient(reactor, url, timeout=2), mongod)
        with pytest.raises(StoreUnavailable, match="noeviction"):
            await refused.start()
        await refused.redis.close()
        allowed = make_store(reactor, SingleRedisClient(reactor, url, timeout=2), mongod, allow_evicting=True)
        await allowed.start()
        await allowed.stop()
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_socket_tracking_forgets_ended_leases_but_keeps_sessions(tiered: RedisStore) -> None:
    c, live = cid(), cid()
    await add(tiered, c, 1)
    await tiered.take(TakeQuery(c), A, lease())
    await tiered.add_session(live, "s", A, lease())
    assert {c, live} <= set(tiered.holders.holds(A))
    much_later = T0 + LEASE_MS + 120_000
    await tiered.release_expired(lease(much_later))
    # A long-lived mediator socket must not accumulate every connection it ever touched. (The
    # sweep may have redelivered other tests' messages on the shared Redis to A: only c and
    # live are this test's.)
    assert c not in tiered.holders.holds(A)
    assert live in tiered.holders.holds(A)
    assert await tiered.remove_session(live, A, None)
    assert live not in tiered.holders.holds(A)


@pytest_twisted.ensureDeferred
async def test_messages_left_by_an_original_deployment_are_queued_again(tiered: RedisStore) -> None:
    c = cid()
    ours = await add(tiered, c, 0, now=T0 + 30_000)  # queued after the upgrade
    await persist_all(tiered, T0 + 60_000)  # our own documents must not be imported twice
    base = datetime.datetime(2025, 1, 27, 16, 20, tzinfo=datetime.UTC)
    originals = [
        {
            "messageId": f"6797b1a5c2e4b0a1b2c3d4e{n}",
            "connectionId": c,
            "recipientKeys": ["did:key:alice"],
            "encryptedMessage": {"protected": f"orig{n}", "iv": "aa", "ciphertext": "bb", "tag": "cc"},
            "state": "pending",
            "createdAt": base + datetime.timedelta(seconds=n),
            "updatedAt": base,
        }
        for n in (2, 1, 3)  # inserted out of time order
    ]
    await tiered.cold._collection.insert_many(originals)
    assert (await tiered.originals.run(force=True)).imported == 3
    assert (await tiered.originals.run(force=True)).found == 0  # marked imported: never again
    assert await tiered.count(c, "did:key:alice", T0) == 4
    taken = await tiered.take(TakeQuery(c, limit=3), A, lease())
    assert [m.payload for m in taken] == [
        orjson.dumps(originals[1]["encryptedMessage"]),
        orjson.dumps(originals[0]["encryptedMessage"]),
        orjson.dumps(originals[2]["encryptedMessage"]),
    ]
    assert [m.received_at_ms for m in taken] == [
        int((base + datetime.timedelta(seconds=n)).timestamp() * 1000) for n in (1, 2, 3)
    ]
    await tiered.remove(c, ids(taken))
    assert await tiered.cold.payloads(ids(taken)) == {}
    assert ids(await tiered.take(TakeQuery(c), A, lease())) == [ours.id]


@pytest_twisted.ensureDeferred
async def test_a_lease_whose_index_entry_was_lost_still_ends_for_a_local_session(tiered: RedisStore) -> None:
    """The sweep reads lease ends from an index written after the script (an instance killed in
    between, or an add whose reply was lost, never writes it); the connections whose live session
    a local socket holds are swept directly once a lease period."""
    c = cid()
    await tiered.add_session(c, "s", A, lease())
    [message] = await add_many(tiered, c, 1)
    tiered.indexes.cancel()
    tiered.indexes._batch.take()  # the index entries of that add are lost
    tiered._next_audit_ms = 0
    after = lease(T0 + LEASE_MS + 1)
    deliveries = [d for d in await tiered.release_expired(after) if d.connection_id == c]
    assert [(d.target, [m.id for m in d.messages]) for d in deliveries] == [(A, [message.id])]
    # and the new lease is in the index again: the next sweep after it ends redelivers too
    await tiered.indexes.write()
    again = lease(T0 + 2 * LEASE_MS + 2)
    tiered._next_audit_ms = again.now_ms + LEASE_MS  # the direct sweep is not what finds it now
    redelivered = [d for d in await tiered.release_expired(again) if d.connection_id == c]
    assert [[m.id for m in d.messages] for d in redelivered] == [[message.id]]
