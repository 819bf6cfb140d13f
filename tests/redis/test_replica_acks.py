"""REDIS_WAIT_REPLICAS: what an acknowledgement of the distributed store is worth when a Redis
Cluster master fails, measured against a real 3-master cluster with one replica each.

- with 1 replica ack, every acknowledged add survives SIGKILL of its master (the replica that
  takes over has it), and with the master's replica paused (SIGSTOP) adds get errors, not acks;
- without replica acks, the acknowledged adds lost in a master kill under load are counted and
  printed (the loss window documented in docs/guarantees.rst), never asserted to be zero.

One cluster for the module; each test uses a master that still has a live replica.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from mpr_server.errors import StoreUnavailable
from mpr_server.model import NewMessage, TakeQuery
from mpr_server.redis import Address, ClusterRedisClient, RedisError, SingleRedisClient, key_slot
from mpr_server.stores.redis.keys import tag as connection_tag
from mpr_server.stores.redis.store import RedisStore
from scripts.services.redis import start_redis_cluster
from tests.redis.test_redis_failover import Pair, healthy_pair, live_nodes, node_clients, replicated, until_it_works
from tests.services import Mongo, start_or_skip
from tests.store_contract import T0, A, add, cid, lease
from tests.test_distributed_store import make_store

NODE_TIMEOUT_MS = 1000
CALL_TIMEOUT_S = 1.0
ADDS = 400  # per kill test
KILL_AFTER = 150  # acknowledged adds before the master is killed
IN_FLIGHT = 8


@pytest.fixture(scope="module")
def acks_cluster() -> Iterator[Any]:
    cluster = start_or_skip(
        "redis cluster with replicas",
        lambda: start_redis_cluster(masters=3, replicas=1, node_timeout_ms=NODE_TIMEOUT_MS),
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest_twisted.async_yield_fixture
async def admin(reactor: Any, acks_cluster: Any) -> AsyncIterator[dict[Address, SingleRedisClient]]:
    clients = node_clients(reactor, acks_cluster)
    yield clients
    for c in clients.values():
        await c.close()


async def open_store(reactor: Any, cluster: Any, mongod: Mongo, wait_replicas: int) -> RedisStore:
    redis = ClusterRedisClient(reactor, live_nodes(cluster), timeout=CALL_TIMEOUT_S)
    store = make_store(reactor, redis, mongod)
    store.wait_replicas = wait_replicas
    await store.start()
    return store


async def close_store(store: RedisStore) -> None:
    try:
        await store.stop()
    except RedisError:
        pass


def connection_on(store: RedisStore, node: Address) -> str:
    assert isinstance(store.redis, ClusterRedisClient)
    c = cid()
    while store.redis.node_for_slot(key_slot(connection_tag(c))) != node:
        c = cid()
    return c


@dataclass
class Stream:
    """Adds issued with IN_FLIGHT in flight at once: which were acknowledged, which failed."""

    acked: list[NewMessage] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    acked_at: list[float] = field(default_factory=list)


async def add_stream(store: RedisStore, c: str, count: int, on_acked: Any) -> Stream:
    stream = Stream()
    next_n = 0

    async def worker() -> None:
        nonlocal next_n
        while next_n < count:
            n = next_n
            next_n += 1
            try:
                message = await add(store, c, n)
            except StoreUnavailable as e:
                stream.failed.append((n, str(e)))
                continue
            stream.acked.append(message)
            stream.acked_at.append(time.monotonic())
            on_acked(len(stream.acked))

    await Deferred.fromCoroutine(_all([worker() for _ in range(IN_FLIGHT)]))
    return stream


async def _all(coros: list[Any]) -> None:
    for d in [Deferred.fromCoroutine(c) for c in coros]:
        await d


async def kill_under_load(
    reactor: Any, cluster: Any, store: RedisStore, pair: Pair
) -> tuple[str, Stream, set[str], float]:
    """Stream adds to a connection on ``pair.master``, SIGKILL the master after KILL_AFTER acks,
    wait until the store answers again; the stream, the ids the store has then, the kill time."""
    c = connection_on(store, pair.master)
    killed_at = 0.0

    def on_acked(n: int) -> None:
        nonlocal killed_at
        if n == KILL_AFTER:
            cluster.node(pair.master.port).kill()
            killed_at = time.monotonic()

    stream = await add_stream(store, c, ADDS, on_acked)
    assert killed_at, f"the master was never killed: {len(stream.acked)} acks, failures {stream.failed[:3]}"
    # a take without a lease changes nothing (so it does not wait for replicas, which the
    # promoted master has none of)
    got = await until_it_works(reactor, lambda: store.take(TakeQuery(c), None, lease()))
    present = {m.id for m in got.value}
    by_id = {m.id: m.payload for m in got.value}
    for message in stream.acked:  # what is there is byte-exact
        if message.id in by_id:
            assert by_id[message.id] == message.payload
    return c, stream, present, killed_at


@pytest_twisted.ensureDeferred
async def test_with_a_paused_replica_adds_get_errors_not_acknowledgements(
    reactor: Any, acks_cluster: Any, admin: dict[Address, SingleRedisClient], mongod: Mongo
) -> None:
    store = await open_store(reactor, acks_cluster, mongod, wait_replicas=1)
    replica = None
    try:
        pair = await healthy_pair(admin)
        c = connection_on(store, pair.master)
        before = await add(store, c, 0)  # acknowledged: the replica has it
        replica = acks_cluster.node(pair.replica.port)
        replica.freeze()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="replicas acknowledged"):
            await add(store, c, 1)
        took = time.monotonic() - started
        assert took < CALL_TIMEOUT_S, f"the error came after {took:.2f}s, beyond the call deadline"
        with pytest.raises(StoreUnavailable, match="replicas acknowledged"):
            await store.remove(c, [before.id])
        # a take that leases changes state too, so it also waits (and fails)
        with pytest.raises(StoreUnavailable, match="replicas acknowledged"):
            await store.take(TakeQuery(c), A, lease())
        replica.thaw()
        replica = None
        # the add that got an error did run on the master: at-least-once, a retry would add it again
        got = await until_it_works(reactor, lambda: store.count(c, None, T0 + 120_000))
        assert got.value in (0, 1)
        after = await add(store, c, 2)  # acknowledged again once the replica is back
        assert after.id
    finally:
        if replica is not None:
            replica.thaw()
        await close_store(store)


@pytest_twisted.ensureDeferred
async def test_with_one_replica_ack_no_acknowledged_add_is_lost_when_the_master_is_killed(
    reactor: Any, acks_cluster: Any, admin: dict[Address, SingleRedisClient], mongod: Mongo
) -> None:
    store = await open_store(reactor, acks_cluster, mongod, wait_replicas=1)
    try:
        pair = await healthy_pair(admin)
        c, stream, present, _ = await kill_under_load(reactor, acks_cluster, store, pair)
        lost = [m.id for m in stream.acked if m.id not in present]
        print(
            f"REDIS_WAIT_REPLICAS=1: {len(stream.acked)} acknowledged, {len(stream.failed)} errors,"
            f" {len(lost)} acknowledged adds lost, {len(present)} present"
        )
        assert lost == []
        assert stream.failed, "adds during the failover should have failed"
        # the promoted replica has no replica of its own: its adds get errors, not acks
        with pytest.raises(StoreUnavailable, match="replicas acknowledged"):
            await add(store, c, ADDS)
    finally:
        await close_store(store)


@pytest_twisted.ensureDeferred
async def test_without_replica_acks_the_loss_window_of_a_master_kill_is_measured(
    reactor: Any, acks_cluster: Any, admin: dict[Address, SingleRedisClient], mongod: Mongo
) -> None:
    store = await open_store(reactor, acks_cluster, mongod, wait_replicas=0)
    try:
        pair = await healthy_pair(admin)
        await replicated(admin, store.redis, pair.master)  # type: ignore[arg-type]
        _, stream, present, killed_at = await kill_under_load(reactor, acks_cluster, store, pair)
        lost = [m for m in stream.acked if m.id not in present]
        acked_before_kill = [t for t in stream.acked_at if t <= killed_at]
        window_ms = 0.0
        if lost:
            index = {m.id: i for i, m in enumerate(stream.acked)}
            window_ms = (killed_at - stream.acked_at[min(index[m.id] for m in lost)]) * 1000
        print(
            f"REDIS_WAIT_REPLICAS=0: {len(acked_before_kill)} acknowledged before the kill,"
            f" {len(stream.acked)} in all, {len(stream.failed)} errors; {len(lost)} acknowledged adds lost"
            f" (loss window {window_ms:.1f} ms before the kill)"
        )
        # what survived is what the store serves; nothing acknowledged after the failover is lost
        assert len(stream.acked) >= KILL_AFTER
        assert all(m.id in present for m in stream.acked[len(acked_before_kill) :])
    finally:
        await close_store(store)
